"""The quickstart's code path in its reduced (smoke) mode: outputs written, teacher reused on a second run."""

from __future__ import annotations

import json

import pytest
import yaml

from transformers import AutoModelForCausalLM

from llmdistill.quickstart.run import run_quickstart
from llmdistill.quickstart.task import SUBTASKS
from llmdistill.quickstart.teacher import embedded_teacher_dir


def test_smoke_quickstart_writes_results_with_the_embedded_teacher(tmp_path):
    results = run_quickstart(tmp_path, smoke=True)
    assert set(results["models"]) == {"teacher", "student-sft", "student-kd"}
    for name in ("results.json", "results.md", "training_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["models"] == results["models"]
    kd = results["models"]["student-kd"]
    assert 0 <= kd["top1_agreement"] <= 100 and kd["teacher_student_kl"] >= 0
    assert results["models"]["teacher"]["parameters"] == AutoModelForCausalLM.from_pretrained(
        embedded_teacher_dir()
    ).num_parameters()
    # the embedded teacher predicts the held-out references better than a student trained for 3 steps
    assert results["models"]["teacher"]["gold_ce"] < kd["gold_ce"]
    assert not (tmp_path / "teacher").exists()  # nothing is trained for the teacher


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
    assert set(switch["by_task"]) == set(SUBTASKS)
    with pytest.raises(SystemExit):
        main(["quickstart", "--smoke", "--cross-tokenizer", "--source", "switch", "--output-dir", str(tmp_path)])


def test_principal_projection_keeps_the_teachers_token_geometry():
    import torch

    from llmdistill.quickstart.run import principal_projection

    generator = torch.Generator().manual_seed(0)
    rank_four = torch.randn(50, 4, generator=generator) @ torch.randn(4, 12, generator=generator)
    projected = principal_projection(rank_four, 4)
    assert projected.shape == (50, 4)
    # every inner product between tokens (what an LM head's logits are made of) survives a projection to the rank
    torch.testing.assert_close(projected @ projected.T, rank_four @ rank_four.T, atol=1e-4, rtol=1e-4)
    full_rank = torch.randn(50, 12, generator=generator)
    projected = principal_projection(full_rank, 4)
    assert (projected @ projected.T - full_rank @ full_rank.T).norm() > 1


def test_quickstart_over_seeds_reports_mean_and_spread_and_says_whether_kd_beats_sft(tmp_path, capsys):
    from llmdistill.cli import main

    main(["quickstart", "--smoke", "--student-seeds", "2", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["student_seeds"] == [0, 1]
    kd = results["models"]["student-kd"]
    assert [row["exact_match"] for row in kd["per_seed"]] and set(kd["seed_std"]) >= {"correct", "exact_match", "gold_ce"}
    assert kd["gold_ce"] == pytest.approx(sum(row["gold_ce"] for row in kd["per_seed"]) / 2)
    for seed in (0, 1):
        assert (tmp_path / f"seed{seed}" / "student-kd" / "model.safetensors").is_file()
    table = (tmp_path / "results.md").read_text()
    assert " ± " in table and "student-kd vs student-sft over 2 seeds: correct answers " in table
    assert "student-kd vs student-sft over 2 seeds" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["quickstart", "--smoke", "--student-seeds", "0", "--output-dir", str(tmp_path)])


def test_training_curves_carry_the_verdict_as_their_title(tmp_path, monkeypatch):
    from llmdistill.quickstart import report

    closed = []
    monkeypatch.setattr(report.plt, "close", closed.append)
    history = [{"step": 1, "loss": 2.0, "ce": 2.0}, {"step": 2, "loss": 1.5, "ce": 1.6}]
    row = {"correct": 10.0, "gold_ce": 1.2}
    results = {"models": {"student-sft": row, "student-kd": row}}
    verdict = "student-kd vs student-sft over 3 seeds: correct answers +0.0"
    report.plot_training_curves({"student-sft": history}, tmp_path / "curves.png", results, verdict)
    assert (tmp_path / "curves.png").is_file() and closed[0]._suptitle.get_text() == verdict


def test_quickstart_students_start_from_the_teachers_embeddings_and_kd_reads_a_teacher_cache(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from llmdistill.cli import main
    from llmdistill.quickstart.run import principal_projection
    from llmdistill.quickstart.teacher import embedded_teacher_dir

    main(["quickstart", "--smoke", "--student-steps", "4", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["student_steps"], results["teacher_embeddings"]) == (4, True)
    kd_config = yaml.safe_load((tmp_path / "student-kd" / "distill_config.yaml").read_text())
    assert kd_config["teacher_cache"] == str(tmp_path / "teacher-cache")
    assert (tmp_path / "teacher-cache" / "teacher_cache.json").is_file()
    history = json.loads((tmp_path / "student-kd" / "log_history.json").read_text())
    assert history[-1]["step"] == 4
    teacher = AutoModelForCausalLM.from_pretrained(embedded_teacher_dir())
    init = AutoModelForCausalLM.from_pretrained(tmp_path / "student-init")
    expected = principal_projection(teacher.get_input_embeddings().weight, init.config.hidden_size)
    torch.testing.assert_close(init.get_input_embeddings().weight, expected)
    for bad in (["--student-steps", "0"], ["--teacher-embeddings", "--cross-tokenizer"]):
        with pytest.raises(SystemExit):
            main(["quickstart", "--smoke", *bad, "--output-dir", str(tmp_path / "bad")])
    main(["quickstart", "--smoke", "--no-teacher-embeddings", "--output-dir", str(tmp_path / "random")])
    assert json.loads((tmp_path / "random" / "results.json").read_text())["teacher_embeddings"] is False
    # another task into the same folder builds its own cache instead of refusing the first run's
    main(["quickstart", "--smoke", "--seed", "1", "--student-steps", "4", "--output-dir", str(tmp_path)])
    assert (tmp_path / "teacher-cache" / "teacher_cache.json").is_file()
