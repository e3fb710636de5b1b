"""How the teacher's and the student's vocabularies relate, decided before any logits are compared.

`VocabBridge.between(teacher_tokenizer, student_tokenizer)` classifies the pair (identical, padded, different),
finds the shared vocabulary C (token pairs whose text is the same bytes) and maps every teacher id to the student id
with the same text (-1 where the student has none). Token text is compared as real bytes: GPT-2's `Ġ`/`Ċ`, the
SentencePiece `▁` and byte-fallback pieces `<0x0A>` all decode to what they stand for.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase

from .errors import ModelError

IDENTICAL, PADDED, DIFFERENT = "identical", "padded", "different"
SENTENCEPIECE_SPACE = "\u2581"
BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def shared_vocab_size(tokenizer: PreTrainedTokenizerBase, teacher_rows: int, student_rows: int) -> int:
    """How many leading head rows two models with the same tokenizer both score: `min(teacher_rows, student_rows)`.

    Heads are often padded past the tokenizer (Qwen2.5-7B: 152,064 rows, 1.5B: 151,936); the padding rows are no
    token, so comparing the shared leading ids is exact as long as every real token has a row in both heads.
    """
    shared = min(teacher_rows, student_rows)
    highest_id = max(tokenizer.get_vocab().values())
    if highest_id >= shared:
        raise ModelError(
            f"token id {highest_id} has no row in a head with {shared} rows: resize the smaller model's embeddings "
            "(model.resize_token_embeddings(len(tokenizer)))."
        )
    return shared


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides how text becomes ids (vocabulary, merges, normaliser, added tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """The bytes of text each id stands for (index = id); None for special tokens, which stand for no text."""
    return list(_token_bytes(tokenizer.backend_tokenizer.to_str(), tuple(tokenizer.all_special_ids)))


@lru_cache(maxsize=8)
def _token_bytes(backend_json: str, special_ids: tuple[int, ...]) -> tuple[bytes | None, ...]:
    backend = json.loads(backend_json)
    decode = _byte_level_piece if _uses_decoder(backend.get("decoder"), "ByteLevel") else _sentencepiece_piece
    vocab = backend["model"]["vocab"]
    pieces = vocab.items() if isinstance(vocab, dict) else ((piece, index) for index, (piece, _) in enumerate(vocab))
    table: dict[int, bytes | None] = {index: decode(piece) for piece, index in pieces}
    for added in backend.get("added_tokens", []):
        table[added["id"]] = None if added["special"] else added["content"].encode()
    for index in special_ids:
        table[index] = None
    return tuple(table.get(index) for index in range(max(table) + 1))


def _uses_decoder(decoder: dict | None, kind: str) -> bool:
    if decoder is None:
        return False
    return decoder["type"] == kind or any(_uses_decoder(d, kind) for d in decoder.get("decoders", []))


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: character → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[chr(byte)] = byte
        else:
            stand_ins[chr(256 + extra)] = byte
            extra += 1
    return stand_ins


def _byte_level_piece(piece: str) -> bytes:
    alphabet = _byte_level_alphabet()
    if all(char in alphabet for char in piece):
        return bytes(alphabet[char] for char in piece)
    return piece.encode()  # a token added as plain text


def _sentencepiece_piece(piece: str) -> bytes:
    byte = BYTE_FALLBACK.match(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return piece.replace(SENTENCEPIECE_SPACE, " ").encode()


@dataclass(frozen=True)
class VocabBridge:
    """The relation between a teacher and a student tokenizer.

    relation: `identical` (same ids for the same tokens), `padded` (one vocabulary extends the other: every id of the
    smaller means the same in the larger) or `different`.
    teacher_to_student: LongTensor[V_T], the student id with the same text as each teacher id, -1 if none.
    shared_teacher_ids / shared_student_ids: the shared vocabulary C as matched id pairs (each id at most once).
    """

    relation: str
    teacher_to_student: torch.Tensor
    shared_teacher_ids: torch.Tensor
    shared_student_ids: torch.Tensor

    @classmethod
    def between(cls, teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase):
        """Built once per pair of tokenizers (cached by their fingerprints)."""
        return _bridge(
            (fingerprint(teacher_tokenizer), fingerprint(student_tokenizer)), teacher_tokenizer, student_tokenizer
        )

    @property
    def same_vocabulary(self) -> bool:
        return self.relation != DIFFERENT

    def teacher_to_student_map(self, teacher_rows: int) -> torch.Tensor:
        """The id map cut or padded (with -1) to the teacher head's row count."""
        mapping = self.teacher_to_student[:teacher_rows]
        return torch.cat([mapping, mapping.new_full((teacher_rows - len(mapping),), -1)])


_BRIDGES: dict[tuple[str, str], VocabBridge] = {}


def _bridge(key: tuple[str, str], teacher_tokenizer, student_tokenizer) -> VocabBridge:
    if key not in _BRIDGES:
        _BRIDGES[key] = _build_bridge(teacher_tokenizer, student_tokenizer)
    return _BRIDGES[key]


def _build_bridge(teacher_tokenizer, student_tokenizer) -> VocabBridge:
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    relation = _relation(teacher_vocab, student_vocab)
    if relation != DIFFERENT:  # the same id means the same token on both sides
        teacher_size, student_size = max(teacher_vocab.values()) + 1, max(student_vocab.values()) + 1
        shared = min(teacher_size, student_size)
        mapping = torch.full((teacher_size,), -1, dtype=torch.long)
        mapping[:shared] = torch.arange(shared)
        ids = torch.arange(shared)
        return VocabBridge(relation, mapping, ids, ids)
    teacher_bytes, student_bytes = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    student_ids = _canonical_ids(student_bytes, student_tokenizer)
    teacher_ids = _canonical_ids(teacher_bytes, teacher_tokenizer)
    mapping = torch.tensor([student_ids.get(text, -1) if text is not None else -1 for text in teacher_bytes])
    pairs = [(teacher_id, student_ids[text]) for text, teacher_id in teacher_ids.items() if text in student_ids]
    for teacher_special, student_special in _special_pairs(teacher_tokenizer, student_tokenizer):
        mapping[teacher_special] = student_special
        pairs.append((teacher_special, student_special))
    shared_teacher, shared_student = torch.tensor(sorted(pairs), dtype=torch.long).reshape(-1, 2).unbind(1)
    return VocabBridge(relation, mapping, shared_teacher, shared_student)


def _relation(teacher_vocab: dict[str, int], student_vocab: dict[str, int]) -> str:
    if teacher_vocab == student_vocab:
        return IDENTICAL
    smaller, larger = sorted((teacher_vocab, student_vocab), key=len)
    extends = all(larger.get(token) == index for token, index in smaller.items())
    if extends and min(larger[token] for token in larger.keys() - smaller.keys()) >= len(smaller):
        return PADDED
    return DIFFERENT


def _canonical_ids(texts: list[bytes | None], tokenizer) -> dict[bytes, int]:
    """One id per text: the regular token the tokenizer would write, over a byte-fallback piece or a duplicate."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(texts))))
    chosen: dict[bytes, int] = {}
    for index in sorted(range(len(texts)), key=lambda i: (bool(BYTE_FALLBACK.match(pieces[i] or "")), i)):
        text = texts[index]
        if text is not None and text not in chosen:
            chosen[text] = index
    return chosen


def _special_pairs(teacher_tokenizer, student_tokenizer) -> list[tuple[int, int]]:
    """End- and begin-of-sequence tokens mean the same to both models although their strings differ."""
    pairs, used_teacher, used_student = [], set(), set()
    for name in ("eos_token_id", "bos_token_id"):
        teacher_id, student_id = getattr(teacher_tokenizer, name), getattr(student_tokenizer, name)
        if None not in (teacher_id, student_id) and teacher_id not in used_teacher and student_id not in used_student:
            pairs.append((teacher_id, student_id))
            used_teacher.add(teacher_id)
            used_student.add(student_id)
    return pairs
