"""VocabBridge: same-tokenizer heads compare their shared ids; different tokenizers meet on the tokens whose text is
the same bytes, whatever marker each family writes for spaces, newlines and raw bytes."""

from __future__ import annotations

import copy

import pytest
import torch

from llmdistill.quickstart.tokenizer import train_tokenizer
from llmdistill.vocab import DIFFERENT, IDENTICAL, PADDED, VocabBridge, shared_vocab_size, token_bytes

from conftest import needs_shared_data

def test_padded_heads_share_the_smaller_row_count(tokenizer):
    assert shared_vocab_size(tokenizer, len(tokenizer) + 128, len(tokenizer)) == len(tokenizer)


def test_a_head_without_rows_for_real_tokens_is_refused(tokenizer):
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        shared_vocab_size(tokenizer, len(tokenizer), len(tokenizer) - 1)


def test_identical_and_padded_tokenizers_map_ids_to_themselves(tokenizer):
    bridge = VocabBridge.between(tokenizer, tokenizer)
    assert bridge.relation == IDENTICAL and bridge.same_vocabulary
    assert torch.equal(bridge.teacher_to_student, torch.arange(len(tokenizer)))

    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(["<tool>"])
    bridge = VocabBridge.between(extended, tokenizer)
    assert bridge.relation == PADDED
    assert bridge.teacher_to_student[len(tokenizer)] == -1
    assert torch.equal(bridge.teacher_to_student[: len(tokenizer)], torch.arange(len(tokenizer)))


def test_different_families_trained_here_meet_on_equal_text(examples):
    texts = [e["prompt"] + e["response"] for e in examples]
    byte_bpe = train_tokenizer(texts, vocab_size=300)
    sentencepiece = train_tokenizer(texts, vocab_size=260, family="sentencepiece")
    bridge = VocabBridge.between(byte_bpe, sentencepiece)
    assert bridge.relation == DIFFERENT and not bridge.same_vocabulary
    teacher_text, student_text = token_bytes(byte_bpe), token_bytes(sentencepiece)
    for teacher_id, student_id in zip(bridge.shared_teacher_ids.tolist(), bridge.shared_student_ids.tolist()):
        special = teacher_id == byte_bpe.eos_token_id or teacher_id == byte_bpe.bos_token_id
        assert special or teacher_text[teacher_id] == student_text[student_id]
    assert bridge.teacher_to_student[byte_bpe.eos_token_id] == sentencepiece.eos_token_id
    space = byte_bpe.convert_tokens_to_ids("Ġ")
    assert student_text[bridge.teacher_to_student[space]] == b" "  # GPT-2's Ġ is SentencePiece's ▁


def test_the_bridge_is_built_once_per_pair_of_tokenizers(tokenizer, examples):
    other = train_tokenizer([e["response"] for e in examples], vocab_size=280, family="sentencepiece")
    assert VocabBridge.between(tokenizer, other) is VocabBridge.between(tokenizer, other)


@needs_shared_data
def test_markers_of_every_family_decode_to_the_real_bytes(real_tokenizers):
    cases = {
        "gpt2": {"Ġthe": b" the", "Ċ": b"\n", "Ġ": b" ", "ÃŃ": "í".encode()},
        "gpt-neox-20b": {"Ġthe": b" the", "Ċ": b"\n"},
        "qwen3": {"Ġthe": b" the", "Ċ": b"\n"},
        "llama2": {"▁the": b" the", "<0x0A>": b"\n", "<0xF0>": b"\xf0"},
        "mistral-7b-v0.1": {"▁the": b" the", "<0x0A>": b"\n"},
    }
    for family, expected in cases.items():
        tokenizer = real_tokenizers[family]
        texts = token_bytes(tokenizer)
        for piece, text in expected.items():
            assert texts[tokenizer.convert_tokens_to_ids(piece)] == text, (family, piece)
        assert texts[tokenizer.eos_token_id] is None


@needs_shared_data
def test_concatenated_token_bytes_reproduce_the_text(real_tokenizers):
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n  Héllo 😀 wörld\t1234"
    for family, tokenizer in real_tokenizers.items():
        texts = token_bytes(tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        joined = b"".join(texts[i] for i in ids)
        assert joined.removeprefix(b" ") == text.encode(), family  # SentencePiece writes a prefix space


@needs_shared_data
def test_real_pairs_share_most_of_the_teachers_vocabulary(real_tokenizers):
    """The shared vocabulary C between real families: thousands of tokens, each pair with equal text."""
    bridge = VocabBridge.between(real_tokenizers["qwen3"], real_tokenizers["llama2"])
    assert bridge.relation == DIFFERENT
    assert len(bridge.shared_teacher_ids) > 20_000
    assert len(set(bridge.shared_student_ids.tolist())) == len(bridge.shared_student_ids)  # one-to-one
    newline = real_tokenizers["qwen3"].convert_tokens_to_ids("Ċ")
    assert bridge.teacher_to_student[newline] == real_tokenizers["llama2"].convert_tokens_to_ids("<0x0A>")
