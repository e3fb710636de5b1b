"""How the teacher's and the student's vocabularies relate, decided before any logits are compared."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class VocabRelation:
    """`kind` is 'identical' (same tokens, same head rows), 'padded' (same tokens, heads padded to different row
    counts) or 'different'. `shared_size` is the number of leading ids both heads score the same way."""

    kind: str
    shared_size: int


def same_tokens(teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when both tokenizers map every token string to the same id (added tokens included)."""
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


def compare_vocabularies(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_rows: int,
    student_rows: int,
) -> VocabRelation:
    """Classify the pair; same-vocabulary methods may compare the first `shared_size` ids of both heads."""
    if not same_tokens(teacher_tokenizer, student_tokenizer):
        return VocabRelation("different", 0)
    shared_size = min(teacher_rows, student_rows)
    highest_id = max(teacher_tokenizer.get_vocab().values())
    if highest_id >= shared_size:
        raise ValueError(
            f"the tokenizers agree but token id {highest_id} has no row in a head with {shared_size} rows: "
            "resize the smaller model's embeddings (model.resize_token_embeddings(len(tokenizer)))."
        )
    kind = "identical" if teacher_rows == student_rows else "padded"
    return VocabRelation(kind, shared_size)
