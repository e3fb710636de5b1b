"""The real checkpoints of ../shared/models/fetch.py ($LLMDISTILL_MODELS) and GSM8K rows in chat form, as the
real-model benchmarks read them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
QWEN_15, QWEN_05, SMOLLM = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"


def models_dir(*names: str) -> Path:
    """$LLMDISTILL_MODELS, once it holds every model of `names`; else the run stops with one line saying so."""
    folder = Path(os.environ.get("LLMDISTILL_MODELS", "")).expanduser()
    missing = [name for name in names if not (folder / name / "config.json").is_file()]
    if not os.environ.get("LLMDISTILL_MODELS") or missing:
        sys.exit(f"set LLMDISTILL_MODELS to a folder holding {', '.join(names)} (../shared/models/fetch.py)")
    return folder


def gsm8k_messages(split: str, rows: int, path: Path) -> Path:
    """The first `rows` GSM8K problems of `split` as user/assistant turns, written to `path` (.jsonl)."""
    with open(SHARED / "data" / "datasets" / "gsm8k" / f"{split}.jsonl") as source, open(path, "w") as out:
        for line, _ in zip(source, range(rows)):
            row = json.loads(line)
            turns = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
            out.write(json.dumps({"messages": turns}) + "\n")
    return path
