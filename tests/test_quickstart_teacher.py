"""The embedded quickstart teacher: shipped weights match their fingerprint, a tampered copy is refused with the
fix named, and the build recipe is deterministic (a rebuild on the same machine gives the same weights)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from llmdistill.quickstart import teacher as embedded
from llmdistill.quickstart.teacher import RECIPE, EmbeddedTeacherError, build_teacher, embedded_teacher_dir

TINY = dataclasses.replace(RECIPE, tokenizer_rows=200, shape=(16, 1, 2), train_rows=64, steps=2, batch_size=8,
                           all_tasks_rows=64, all_tasks_steps=2)


def test_shipped_teacher_matches_its_fingerprint():
    directory = embedded_teacher_dir()
    assert embedded.sha256_of(directory / embedded.WEIGHTS_FILE) == embedded.EMBEDDED_SHA256
    assert (directory / "tokenizer.json").is_file() and (directory / "recipe.json").is_file()


def test_tampered_or_missing_teacher_is_refused_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    copy = tmp_path / "teacher"
    shutil.copytree(embedded_teacher_dir(), copy)
    monkeypatch.setattr(embedded, "EMBEDDED_DIR", copy)
    weights = copy / embedded.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(EmbeddedTeacherError, match="model.safetensors.*reinstall llmdistill"):
        embedded_teacher_dir()
    weights.unlink()
    with pytest.raises(EmbeddedTeacherError, match="missing.*python -m llmdistill.quickstart.teacher"):
        embedded_teacher_dir()


def test_teacher_build_is_deterministic(tmp_path):
    first = build_teacher(tmp_path / "a", TINY)
    assert build_teacher(tmp_path / "b", TINY) == first


def test_shipped_teacher_is_strong_on_prompts_it_never_saw():
    """The quickstart's premise: a teacher worth distilling (the recipe's README figure, at least 80% correct on the
    quickstart's held-out prompts, long responses included, and mostly right on the open-ended sub-tasks too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmdistill.quickstart.run import DEFAULT, greedy_scores
    from llmdistill.quickstart.task import OPEN_ENDED, make_splits

    directory = embedded_teacher_dir()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    scores = greedy_scores(model, tokenizer, make_splits(0, 0, DEFAULT.n_eval)[1], DEFAULT.max_new_tokens)
    assert scores["correct"] >= 80 and scores["long"]["rows"] >= 10 and scores["long"]["correct"] >= 50
    assert all(scores["by_task"][task]["correct"] >= 60 for task in OPEN_ENDED)
