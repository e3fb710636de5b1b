"""The quickstart's outputs: a Markdown results table and a PNG of the training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

COLUMNS = (
    ("exact_match", "exact match % ↑"),
    ("rouge_l", "ROUGE-L ↑"),
    ("teacher_student_kl", "teacher→student KL ↓"),
    ("top1_agreement", "top-1 agreement % ↑"),
    ("parameters", "parameters"),
)


def results_table(results: dict) -> str:
    header = "| model | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in results["models"].items():
        cells = [_format(row.get(key)) for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def plot_training_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Training loss and cross-entropy per step for each model trained."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        for axis, key in zip(axes, ("loss", "ce")):
            points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
            if points:
                axis.plot(*zip(*points), label=name)
    for axis, title in zip(axes, ("training loss ((1-α)·CE + α·KD)", "cross-entropy on the gold response")):
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.set_yscale("log")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
