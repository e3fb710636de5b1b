"""What a training run shows: a progress bar on a terminal and each log as one `step N/M  key=value ...` line."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm
from transformers import TrainerCallback

BAR_POSTFIX = ("loss", "kd", "ce")  # the latest values of these ride on the bar


class TrainingProgress(TrainerCallback):
    """Replaces the Trainer's ProgressCallback / PrinterCallback, which print each log as a raw dict. On a terminal
    (and unless disable_tqdm) the main process shows a step bar with the latest loss, and writes each log above it as
    one line; elsewhere (a file, a pipe) it prints the lines alone, which stay easy to grep."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not args.disable_tqdm and sys.stderr.isatty():
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = log_line(state.global_step, state.max_steps, logs)
        if self.bar is None:
            print(line, flush=True)
            return
        self.bar.write(line)
        shown = {key: _format(logs[key]) for key in BAR_POSTFIX if key in logs}
        if shown:
            self.bar.set_postfix(shown, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def log_line(step: int, max_steps: int, logs: dict) -> str:
    """`step 10/100  loss=2.855  ce=5.699 ...`: numbers to four significant digits, total_flos left out."""
    values = "  ".join(f"{key}={_format(value)}" for key, value in logs.items() if key != "total_flos")
    return f"step {step}/{max_steps}  {values}"


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
