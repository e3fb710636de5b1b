"""benchmarks/real_models.py --render: the report of saved scores counts each method's seeds, shows the seed spread
of reference CE and KL, and judges each claim over the seeds both of its methods ran, pair by pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_models.py"


def _scores(ce: float, kl: float) -> dict:
    return {"gsm8k": {"reference_ce": ce, "teacher_student_kl": kl, "teacher_student_kl_long": kl,
                      "top1_agreement": 50.0}}


def test_render_pairs_seeds_and_shows_their_spread(tmp_path):
    scores = tmp_path / "cpu" / "scores"
    scores.mkdir(parents=True)
    saved = {"same-sft-s0": _scores(2.3, 1.6), "same-sft-s1": _scores(2.2, 1.5), "same-sft-s2": _scores(2.1, 1.4),
             "same-vanilla_kd-s0": _scores(2.2, 1.5), "same-vanilla_kd-s1": _scores(2.25, 1.45),
             "same-vanilla_kd-s2": _scores(2.0, 1.3), "same-dskd-s0": _scores(2.15, 1.49),
             "same-skd-s0": _scores(2.3, 1.6), "same-skd-s1": {"gsm8k": {"reference_ce": 2.1}}}  # s1: no KL yet
    for name, row in saved.items():
        (scores / f"{name}.json").write_text(json.dumps(row))
    results = tmp_path / "report" / "real_models"
    subprocess.run([sys.executable, str(SCRIPT), "--render", "--work", str(tmp_path), "--results", str(results)],
                   check=True, capture_output=True, timeout=120)
    report = results.with_suffix(".md").read_text()

    assert "| sft | 3 | — | — | — | 2.200 ± 0.100 | 1.500 ± 0.100 |" in report
    assert "| dskd | 1 | — | — | — | 2.150 | 1.490 |" in report
    assert "| on_policy | | not run |" in report
    assert "| skd | 2 | — | — | — | 2.200 ± 0.141 | — |" in report  # KL until every seed has it: not yet
    # vanilla KD against SFT over all three seeds, per seed: 0.1 ahead, 0.05 behind, 0.1 ahead
    assert ("same: vanilla_kd vs sft (seeds 0, 1, 2): GSM8K accuracy not measured at this budget; reference CE lower "
            "by 0.050; KL lower by 0.083;") in report
    assert "per seed, how much lower: CE +0.100, -0.050, +0.100 (ahead at 2 of 3); KL +0.100, +0.050, +0.100 " \
           "(ahead at 3 of 3)." in report
    # DSKD ran one seed: its claim is judged at that seed alone
    assert "same: dskd vs vanilla_kd (seed 0): GSM8K accuracy not measured at this budget; reference CE lower by " \
           "0.050; KL lower by 0.010;" in report
    assert "same: switch vs on_policy: not run yet." in report
