"""How the teacher's and the student's vocabularies relate, decided before any logits are compared."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def same_tokens(teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when both tokenizers map every token string to the same id (added tokens included)."""
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


def shared_vocab_size(tokenizer: PreTrainedTokenizerBase, teacher_rows: int, student_rows: int) -> int:
    """How many leading head rows two models with the same tokenizer both score: `min(teacher_rows, student_rows)`.

    Heads are often padded past the tokenizer (Qwen2.5-7B: 152,064 rows, 1.5B: 151,936); the padding rows are no
    token, so comparing the shared leading ids is exact as long as every real token has a row in both heads.
    """
    shared = min(teacher_rows, student_rows)
    highest_id = max(tokenizer.get_vocab().values())
    if highest_id >= shared:
        raise ValueError(
            f"token id {highest_id} has no row in a head with {shared} rows: resize the smaller model's embeddings "
            "(model.resize_token_embeddings(len(tokenizer)))."
        )
    return shared
