"""Exact Token Alignment: llmdistill.align against the reference string walk, on real tokenizers and texts.

Every pair among five tokenizer families (GPT-2, GPT-NeoX-20B, Llama-2, Mistral-7B, Qwen3), over texts from GSM8K
answers, Dolly and Self-Instruct (instruction, input and response joined by newlines). Per pair: the aligned
fraction (aligned pairs / student tokens covering text) and student tokens per second of

  ours         `align_batch`: both sides' byte spans from ids and offsets, and the join, all texts in one pass,
               from the tokenizer's batched output (padded arrays, `return_tensors="np"`)
  per text     `token_byte_spans` for both sides, then `align_spans`; one text at a time
  join only    `align_spans` once over spans computed beforehand, each text shifted into a byte range of its own
  reference    the string walk of METHODS §3.1 (`reference_walk`); one call per text

All four start from pre-tokenised input as the tokenizer gives it (ids and character offsets; token strings for the
walk): tokenisation is timed for none of them. Time is the best of --repeats passes over all texts. Prints one JSON line per pair and writes
benchmarks/results/alignment.md.

    python benchmarks/alignment.py                               # 100 texts per dataset, all 10 pairs
    python benchmarks/alignment.py --texts-per-dataset 20 --repeats 1
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from llmdistill.align import align_batch, align_spans, token_byte_spans
from llmdistill.models import load_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAMILIES = ("gpt2", "gpt-neox-20b", "llama2", "mistral-7b-v0.1", "qwen3")
RESULTS = Path(__file__).parent / "results" / "alignment.md"
MARKERS = str.maketrans({"\u0120": " ", "\u2581": " "})  # Ġ and ▁, the only characters the walk normalises


def load_family(family: str, shared: Path, scratch: Path):
    """A shared tokenizer; qwen3's tokenizer.json is stored gzipped, gpt-neox-20b's folder names no EOS."""
    folder = shared / "tokenizers" / family
    if (folder / "tokenizer.json.gz").is_file():
        unpacked = scratch / family
        unpacked.mkdir()
        with gzip.open(folder / "tokenizer.json.gz") as packed, open(unpacked / "tokenizer.json", "wb") as plain:
            shutil.copyfileobj(packed, plain)
        shutil.copy(folder / "tokenizer_config.json", unpacked)
        folder = unpacked
    if family == "gpt-neox-20b":
        named = scratch / family
        AutoTokenizer.from_pretrained(folder, eos_token="<|endoftext|>").save_pretrained(named)
        folder = named
    return load_tokenizer(str(folder))


def read_jsonl(path: Path, count: int) -> list[dict]:
    with path.open() as lines:
        return [json.loads(line) for line in itertools.islice(lines, count)]


def dataset_texts(shared: Path, per_dataset: int) -> list[str]:
    datasets = shared / "datasets"
    gsm8k = [row["answer"] for row in read_jsonl(datasets / "gsm8k" / "test.jsonl", per_dataset)]
    dolly = [
        "\n".join(part for part in (row["instruction"], row["input"], row["output"]) if part)
        for row in read_jsonl(datasets / "minillm-kd-eval" / "dolly" / "valid.jsonl", per_dataset)
    ]
    self_instruct = [
        "\n".join(part for part in (row["instruction"], instance["input"], instance["output"]) if part)
        for row in read_jsonl(datasets / "self-instruct" / "user_oriented_instructions.jsonl", per_dataset)
        for instance in row["instances"][:1]
    ]
    return gsm8k + dolly + self_instruct


class Encoded:
    """One text as one tokenizer sees it: ids, character offsets, token strings, byte spans."""

    def __init__(self, text: str, tokenizer):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        self.ids, self.offsets = encoding["input_ids"], encoding["offset_mapping"]
        self.strings = tokenizer.convert_ids_to_tokens(self.ids)
        self.spans = token_byte_spans(text, self.offsets, self.ids, tokenizer)


def batch_encoding(texts: list[str], tokenizer):
    """What a batched pipeline gets from the tokenizer: padded arrays of ids, offsets and the attention mask."""
    return tokenizer(
        texts, add_special_tokens=False, return_offsets_mapping=True, return_tensors="np", padding=True
    )


def reference_walk(teacher_strings: list[str], student_strings: list[str]) -> list[tuple[int, int]]:
    """The reference: two pointers over the token strings, normalised by replacing only Ġ and ▁ with a space.

    The side whose accumulated string is shorter (the teacher on a tie) takes its next token. When both accumulated
    strings are equal, the stretch closes; it is an aligned pair when each side took exactly one token. Strings
    written differently (Ċ vs <0x0A>, Ã© vs é) never close again unless the accumulations happen to become equal
    later, so the walk aligns nothing after the first such place. As a favour to it, the first token's leading
    spaces are dropped on both sides, so SentencePiece's dummy prefix does not desynchronise it at token 0.
    """
    teacher = [string.translate(MARKERS) for string in teacher_strings]
    student = [string.translate(MARKERS) for string in student_strings]
    if teacher and student:
        teacher[0], student[0] = teacher[0].lstrip(" "), student[0].lstrip(" ")
    pairs, j, i, teacher_text, student_text, teacher_taken, student_taken = [], 0, 0, "", "", 0, 0
    while j < len(teacher) or i < len(student):
        if j < len(teacher) and (len(teacher_text) <= len(student_text) or i == len(student)):
            teacher_text, j, teacher_taken = teacher_text + teacher[j], j + 1, teacher_taken + 1
        else:
            student_text, i, student_taken = student_text + student[i], i + 1, student_taken + 1
        if teacher_text == student_text:
            if teacher_taken == student_taken == 1:
                pairs.append((j - 1, i - 1))
            teacher_text, student_text, teacher_taken, student_taken = "", "", 0, 0
    return pairs


def best_seconds(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def shifted_batch(texts: list[str], sides: list[Encoded]) -> np.ndarray:
    """All texts' spans in one array, each text moved past the previous ones' bytes, so one call aligns them all."""
    starts = np.cumsum([0] + [len(text.encode()) + 1 for text in texts[:-1]])
    return np.concatenate([np.where(side.spans >= 0, side.spans + start, -1) for side, start in zip(sides, starts)])


def compare(texts: list[str], teacher: list[Encoded], student: list[Encoded], tokenizers, repeats: int) -> dict:
    teacher_tokenizer, student_tokenizer = tokenizers
    student_tokens = sum(text_token_count(side, student_tokenizer) for side in student)
    teacher_batch, student_batch = (batch_encoding(texts, tokenizer) for tokenizer in tokenizers)

    def ours():
        return align_batch(texts, teacher_batch, student_batch, *tokenizers)

    def per_text():
        return [
            align_spans(
                token_byte_spans(text, t.offsets, t.ids, teacher_tokenizer),
                token_byte_spans(text, s.offsets, s.ids, student_tokenizer),
            )
            for text, t, s in zip(texts, teacher, student)
        ]

    batch_teacher, batch_student = shifted_batch(texts, teacher), shifted_batch(texts, student)
    ours_pairs = [set(zip(t.tolist(), s.tolist())) for t, s in ours()]
    assert ours_pairs == [set(zip(t.tolist(), s.tolist())) for t, s in per_text()], "batched and per-text differ"
    reference = [reference_walk(t.strings, s.strings) for t, s in zip(teacher, student)]
    seconds = {
        "ours": best_seconds(ours, repeats),
        "per_text": best_seconds(per_text, repeats),
        "join": best_seconds(lambda: align_spans(batch_teacher, batch_student), repeats),
        "reference": best_seconds(lambda: [reference_walk(t.strings, s.strings) for t, s in zip(teacher, student)],
                                  repeats),
    }
    row = {
        "texts": len(texts),
        "student_tokens": student_tokens,
        "ours_aligned": sum(map(len, ours_pairs)),
        "reference_aligned": sum(map(len, reference)),
        "reference_pairs_ours_lacks": sum(len(set(r) - o) for r, o in zip(reference, ours_pairs)),
    }
    row["ours_fraction"] = row["ours_aligned"] / student_tokens
    row["reference_fraction"] = row["reference_aligned"] / student_tokens
    for method, spent in seconds.items():
        row[f"{method}_tokens_per_s"] = student_tokens / spent
        row[f"{method}_speedup"] = seconds["reference"] / spent
    row["aligned_pairs_per_s_ratio"] = row["ours_speedup"] * row["ours_aligned"] / max(row["reference_aligned"], 1)
    return row


def text_token_count(side: Encoded, tokenizer) -> int:
    """The tokens that cover text (not special tokens)."""
    return int((~np.isin(side.ids, tokenizer.all_special_ids)).sum())


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, NumPy {np.__version__}"
    )


def write_results(rows: list[dict], args) -> None:
    header = (
        "| teacher → student | student tokens | aligned: ours | aligned: reference | reference pairs ours lacks "
        "| ours tok/s | reference tok/s | speed-up: ours | per text | join only | aligned pairs/s: ours ÷ reference |"
    )
    lines = [
        "# Exact Token Alignment vs the reference string walk",
        "",
        f"`python benchmarks/alignment.py --texts-per-dataset {args.texts_per_dataset} --repeats {args.repeats}` "
        f"on {machine()}.",
        "",
        f"{rows[0]['texts']} texts: the first {args.texts_per_dataset} GSM8K test answers, Dolly (minillm-kd-eval "
        "valid) and Self-Instruct user-oriented tasks, instruction, input and response joined by newlines; no special "
        "tokens. Aligned = pairs / student tokens covering text. Tokens per second count student tokens; every method "
        "starts from pre-tokenised input as the tokenizer gives it (ids and character offsets: padded arrays for ours, "
        f"Python lists per text; token strings for the walk), tokenisation untimed; best of {args.repeats} passes.",
        "",
        "* ours: `llmdistill.align.align_batch`: byte spans of both sides from ids and offsets, and the join, for all",
        "  texts in one pass, from the tokenizer's batched output (`return_tensors=\"np\", padding=True`).",
        "* per text: `token_byte_spans` for both sides, then `align_spans`, one text at a time.",
        "* join only: one `align_spans` over spans computed beforehand (each text shifted into a byte range of its own).",
        "* reference: the string walk METHODS §3.1 replaces, reimplemented (`reference_walk`): two pointers over the",
        "  token strings, normalised by replacing only `Ġ` and `▁` with a space; the side whose accumulated string is",
        "  shorter (the teacher on a tie) takes its next token; when both accumulated strings are equal the stretch",
        "  closes, and is an aligned pair when each side took exactly one token. It never resynchronises except when",
        "  the accumulations happen to become equal again, so after the first character the two families write",
        "  differently (`Ċ` vs `<0x0A>`, `Ã©` vs `é`) it aligns nothing. Favour to it: the first token's leading",
        "  spaces are dropped on both sides, so SentencePiece's dummy prefix does not stop it at token 0.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for row in rows:
        lines.append(
            f"| {row['teacher']} → {row['student']} | {row['student_tokens']} | {row['ours_fraction']:.3f} "
            f"| {row['reference_fraction']:.3f} | {row['reference_pairs_ours_lacks']} "
            f"| {row['ours_tokens_per_s']:.3g} | {row['reference_tokens_per_s']:.3g} "
            f"| {row['ours_speedup']:.1f}× | {row['per_text_speedup']:.1f}× | {row['join_speedup']:.0f}× "
            f"| {row['aligned_pairs_per_s_ratio']:.0f}× |"
        )
    lines += ["", *summary(rows)]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")


def summary(rows: list[dict]) -> list[str]:
    def spread(key, digits=1):
        return f"{min(row[key] for row in rows):.{digits}f}–{max(row[key] for row in rows):.{digits}f}×"

    covers = all(row["reference_pairs_ours_lacks"] == 0 for row in rows)
    return [
        f"Every pair the reference aligns, ours aligns too: {covers}. Student tokens processed per second, ours over "
        f"the walk: {spread('ours_speedup')} (per text {spread('per_text_speedup')}; the join alone "
        f"{spread('join_speedup', 0)}); aligned pairs produced per second: {spread('aligned_pairs_per_s_ratio', 0)}.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared-data", type=Path, default=SHARED_DATA, help="folder with tokenizers/ and datasets/")
    parser.add_argument("--texts-per-dataset", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per method; the best counts")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.shared_data.is_dir():
        sys.exit(f"{args.shared_data} (real tokenizers and datasets) does not exist: pass --shared-data")
    texts = dataset_texts(args.shared_data, args.texts_per_dataset)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizers = {family: load_family(family, args.shared_data, Path(scratch)) for family in FAMILIES}
    encoded = {family: [Encoded(text, tokenizer) for text in texts] for family, tokenizer in tokenizers.items()}
    rows = []
    for teacher, student in itertools.combinations(FAMILIES, 2):
        pair = (tokenizers[teacher], tokenizers[student])
        rows.append({"teacher": teacher, "student": student,
                     **compare(texts, encoded[teacher], encoded[student], pair, args.repeats)})
        print(json.dumps(rows[-1]), flush=True)
    write_results(rows, args)


if __name__ == "__main__":
    main()
