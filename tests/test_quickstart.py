"""The quickstart's code path in its reduced (smoke) mode: outputs written, teacher reused on a second run."""

from __future__ import annotations

import json

import pytest

from llmdistill.quickstart.run import run_quickstart


def test_smoke_quickstart_writes_results_and_reuses_the_teacher(tmp_path, capsys):
    results = run_quickstart(tmp_path, smoke=True)
    assert set(results["models"]) == {"teacher", "student-sft", "student-kd"}
    for name in ("results.json", "results.md", "training_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["models"] == results["models"]
    kd = results["models"]["student-kd"]
    assert 0 <= kd["top1_agreement"] <= 100 and kd["teacher_student_kl"] >= 0
    teacher_weights = (tmp_path / "teacher" / "model.safetensors").stat().st_mtime_ns

    run_quickstart(tmp_path, smoke=True)
    assert "reusing the teacher" in capsys.readouterr().out
    assert (tmp_path / "teacher" / "model.safetensors").stat().st_mtime_ns == teacher_weights


def test_quickstart_objective_dskd_trains_a_dskd_student_beside_sft(tmp_path):
    from llmdistill.cli import main

    main(["quickstart", "--smoke", "--objective", "dskd", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["models"]) == {"teacher", "student-sft", "student-dskd"}
    assert results["models"]["student-dskd"]["seconds_per_step"] > 0
    assert (tmp_path / "student-dskd" / "projectors.safetensors").is_file()
    history = json.loads((tmp_path / "student-dskd" / "log_history.json").read_text())
    assert any("t2s_accuracy" in entry for entry in history)


def test_quickstart_cross_tokenizer_trains_students_on_their_own_tokenizer(tmp_path):
    from llmdistill.cli import main

    main(["quickstart", "--smoke", "--cross-tokenizer", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "cross_tokenizer" / "results.json").read_text())
    assert set(results["models"]) == {"teacher", "student-sft", "student-dskd_eta"}
    assert 0 < results["models"]["student-dskd_eta"]["aligned_fraction"] < 1
    student_vocab = json.loads((tmp_path / "cross_tokenizer" / "student-dskd_eta" / "tokenizer.json").read_text())
    assert student_vocab["pre_tokenizer"]["type"] == "Metaspace"  # not the teacher's byte-level BPE
    with pytest.raises(SystemExit):
        main(["quickstart", "--smoke", "--cross-tokenizer", "--objective", "vanilla", "--output-dir", str(tmp_path)])


def test_quickstart_source_switch_trains_the_kd_student_on_switch_rollouts(tmp_path):
    from llmdistill.cli import main

    main(["quickstart", "--smoke", "--source", "switch", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["models"]) == {"teacher", "student-sft", "student-kd-switch"}
    switch = results["models"]["student-kd-switch"]
    assert switch["generated_batches_fraction"] == 1.0 and 0 <= switch["teacher_written_fraction"] <= 1
    assert set(switch["by_task"]) == {"arithmetic", "reverse", "sort", "lookup", "count", "repeat", "uppercase"}
    with pytest.raises(SystemExit):
        main(["quickstart", "--smoke", "--cross-tokenizer", "--source", "switch", "--output-dir", str(tmp_path)])
