"""benchmarks/methods.py and benchmarks/real_data.py on the smoke settings: the every-method comparison trains and
scores each method it is given, writes its table and chart, and the real-data evaluation runs on its models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from conftest import needs_shared_data

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
METHODS = ["SFT", "KD (fkl)", "KD (fkl, τ = 2)", "KD (fkl, α = 1)", "DSKD", "DSKD, teacher-embedding init", "SWITCH",
           "SFT, own tokenizer", "DSKD-ETA"]


def _run(script: str, *arguments: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@needs_shared_data
def test_methods_benchmark_tables_every_method_it_trains_and_real_data_evaluates_them(tmp_path):
    _run("methods.py", "--smoke", "--methods", *METHODS, "--output-dir", str(tmp_path))
    table = (tmp_path / "methods.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in table
    assert "| KD (rkl) |" not in table
    assert "| KD > SFT | correct % ↑ | KD (fkl): " in table and "| KD > SFT | held-out CE ↓ |" in table
    # only the claims whose two methods ran are judged
    assert "DSKD > vanilla KD (DSKD paper)" in table and "SWITCH > student-only" not in table
    assert "t2s accuracy at the end of training: DSKD " in table
    assert "time per step vs SFT |" in table and "time per step vs SFT, own tokenizer |" in table
    for header in (line for line in table.splitlines() if line.startswith("| student |")):
        titles = header.strip("| ").split(" | ")
        assert len(titles) == len(set(titles)) and "s / step" in titles and "ROUGE-L ↑" in titles, header
    assert (tmp_path / "methods.png").stat().st_size > 10_000
    trained_with = {name: yaml.safe_load((tmp_path / "seed0" / name / "distill_config.yaml").read_text())
                    for name in ("kd-fkl", "kd-fkl-τ--2", "kd-fkl-α--1")}
    assert [(c["temperature"], c["alpha_kd"]) for c in trained_with.values()] == [(1.0, 0.5), (2.0, 0.5), (1.0, 1.0)]
    assert " of 1 |" in table  # the claims count the seeds where the claimed-better student is ahead

    # a student is reused only when its job and the teacher it was trained against are the same: SFT's saved row
    # claims another teacher, so only KD's is reused
    saved = tmp_path / "seed0" / "sft" / "benchmark_row.json"
    saved.write_text(saved.read_text().replace('"teacher": "', '"teacher": "an earlier teacher '))
    _run("methods.py", "--smoke", "--methods", "SFT", "KD (fkl)", "--output-dir", str(tmp_path))
    assert "reused 1 of 2 students" in (tmp_path / "methods.md").read_text()

    _run("real_data.py", "--models-dir", str(tmp_path), "--limit", "1", "--seeds", "10", "--workers", "1",
         "--results", str(tmp_path / "real_data.md"))
    real = (tmp_path / "real_data.md").read_text()
    assert "| dolly ROUGE-L ↑ |" in real and "gsm8k exact match % ↑" in real
    assert "| DSKD-ETA (own tokenizer) |" in real


def test_methods_benchmark_names_an_unknown_method():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "methods.py"), "--smoke", "--methods", "KD (xyz)"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "unknown ['KD (xyz)']" in result.stderr
