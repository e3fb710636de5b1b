"""The quickstart's outputs: a Markdown results table and a PNG of the training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

COLUMNS = (  # key, header, number format
    ("correct", "correct % ↑", "{:.1f}"),
    ("exact_match", "exact match % ↑", "{:.1f}"),
    ("rouge_l", "ROUGE-L ↑", "{:.1f}"),
    ("gold_ce", "held-out CE ↓", "{:.3f}"),
    ("gold_ce_open", "held-out CE, open-ended ↓", "{:.3f}"),
    ("teacher_student_kl", "teacher→student KL ↓", "{:.3f}"),
    ("top1_agreement", "top-1 agreement % ↑", "{:.1f}"),
    ("teacher_written_fraction", "teacher-written share of generated training tokens", "{:.1%}"),
    ("parameters", "parameters", "{:,}"),
)


def results_table(results: dict) -> str:
    """One row per model; a column no model has a value for is left out; mean ± std where a model was trained
    from several seeds."""
    rows = results["models"]
    columns = [column for column in COLUMNS if any(row.get(column[0]) is not None for row in rows.values())]
    header = "| model | " + " | ".join(title for _, title, _ in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [_cell(row, key, fmt) for key, _, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: dict, key: str, fmt: str) -> str:
    if row.get(key) is None:
        return "—"
    spread = row.get("seed_std", {}).get(key)
    return fmt.format(row[key]) + ("" if spread is None or key == "parameters" else " ± " + fmt.format(spread))


def plot_training_curves(
    histories: dict[str, list[dict]], path: Path, results: dict | None = None, title: str | None = None
) -> None:
    """Training loss and cross-entropy per step for each model trained (the first seed's), and, with `results`,
    held-out correct answers and CE per model (mean ± std over seeds); `title` (the verdict) above them."""
    panels = 2 + 2 * (results is not None)
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    for name, history in histories.items():
        for axis, key in zip(axes, ("loss", "ce")):
            points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
            if points:
                axis.plot(*zip(*points), label=name)
    for axis, heading in zip(axes, ("training loss ((1-α)·CE + α·KD)", "cross-entropy on the gold response")):
        axis.set_title(heading)
        axis.set_xlabel("optimizer step")
        axis.set_yscale("log")
        axis.legend()
    if results is not None:
        for axis, (key, heading) in zip(axes[2:], (("correct", "held-out correct % ↑"),
                                                   ("gold_ce", "held-out CE on the references ↓"))):
            names = list(results["models"])
            values = [results["models"][name][key] for name in names]
            spreads = [results["models"][name].get("seed_std", {}).get(key, 0.0) for name in names]
            axis.bar(range(len(names)), values, yerr=spreads, capsize=4, color="tab:gray")
            axis.set_xticks(range(len(names)), names, rotation=20)
            axis.set_title(heading)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
