"""DistillConfig: every distillation option as a dataclass field (Python kwarg, YAML key and CLI flag)."""

from __future__ import annotations

import difflib
import functools
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .config_checks import check_options
from .divergences import DIVERGENCES
from .errors import ConfigError
from .objectives import OBJECTIVES
from .rollout import SCHEDULES, Intervention, Sampling
from .sources import RULE, SOURCES

CONFIG_FILENAME = "distill_config.yaml"


@dataclass
class DistillConfig(TrainingArguments):
    """`transformers.TrainingArguments` plus what distillation needs.

    The loss is `(1 - alpha_kd) * CE(student, gold) + alpha_kd * KD(teacher || student)`, every token sum divided
    by the number of supervised (response) tokens in the whole optimizer step.
    """

    # Models
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a local folder or a hub name. Not needed for objective 'sft'. Several teachers of the "
            "student's vocabulary: a comma-separated list (a YAML list too); each row is then routed to one by "
            "teacher_routing_column, or else the target is the average of their distributions."
        },
    )
    teacher_routing_column: str | None = field(
        default=None,
        metadata={
            "help": "Several teachers: the dataset column naming each row's teacher (its 0-based place in "
            "teacher_model_name_or_path, or the name as listed there)."
        },
    )
    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Student to train: a local folder or a hub name."}
    )
    teacher_tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher tokenizer, if not stored with the teacher."}
    )
    student_tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Student tokenizer, if not stored with the student."}
    )
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype to load both models in: float32, bfloat16, float16 or auto (the checkpoint's)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    use_peft: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters on the student (needs the peft extra); the output is the adapter."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt; by default every linear layer except the LM head."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full beside the adapters (e.g. lm_head); the LM head stays frozen otherwise."},
    )

    # Data
    dataset_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Training data: a .jsonl/.json file, a folder saved with `datasets`, or a hub dataset name."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_eval_split: str | None = field(
        default=None, metadata={"help": "Hub dataset split to evaluate on (optional)."}
    )
    eval_dataset_name_or_path: str | None = field(
        default=None, metadata={"help": "Evaluation data in its own file or folder (optional)."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt text."})
    response_column: str | None = field(
        default=None,
        metadata={"help": "Column holding the response; by default the first of 'output', 'completion', 'response'."},
    )
    messages_column: str = field(
        default="messages", metadata={"help": "Column holding chat messages (rendered with the chat template)."}
    )
    max_prompt_length: int = field(default=256, metadata={"help": "Longest prompt in tokens."})
    max_length: int = field(default=512, metadata={"help": "Longest prompt + response in tokens; responses are cut."})
    drop_overlong_prompts: bool = field(
        default=False,
        metadata={"help": "Skip (and count) examples whose prompt exceeds max_prompt_length instead of stopping."},
    )

    # Distillation
    objective: str = field(
        default="vanilla",
        metadata={"help": f"What to train with: 'sft' (CE only, no teacher) or one of {', '.join(OBJECTIVES)}."},
    )
    divergence: str = field(
        default="fkl", metadata={"help": f"Token-level divergence D(teacher||student): {', '.join(DIVERGENCES)}."}
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "jsd mixing weight: 0 = forward KL, 1 = reverse KL."})
    skew_alpha: float = field(default=0.1, metadata={"help": "skl/srkl skew weight α in [0, 1]."})
    akl_mu: float = field(default=0.5, metadata={"help": "akl head/tail split of the teacher's probability mass."})
    alpha_kd: float = field(default=0.5, metadata={"help": "Weight of KD in (1 - alpha_kd) * CE + alpha_kd * KD."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature for both models in KD."})
    opd_estimator: str = field(
        default="k1",
        metadata={
            "help": "objective=opd (sampled-token on-policy distillation): k1 (policy gradient with advantage "
            "log p_T − log q_S per sampled token) or k3 (the k3 KL estimator differentiated as a loss)."
        },
    )
    scale_kd_by_temperature_squared: bool = field(
        default=False, metadata={"help": "Multiply the KD term by temperature² (Hinton); off as in the DSKD scripts."}
    )
    dskd_s2t: str = field(
        default="closed_form",
        metadata={
            "help": "DSKD student→teacher projector: closed_form (W_S·pinv(W_T) on the shared ids, recomputed when "
            "the student head changes) or learned (initialised to that, then trained)."
        },
    )
    dskd_spaces: str = field(
        default="both",
        metadata={"help": "DSKD ablations: both spaces, student (student space only) or teacher (teacher space only)."},
    )
    projector_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the DSKD/CMA projectors (their own parameter groups). Unset: each projector "
            "layer gets 0.3 · rms(W) / √fan_in, which bounds Adam's first steps to 30% of the layer's outputs on any "
            "pair of models (the papers' 1e-3 blows up on real checkpoints; llmdistill.projector_rates says why)."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Supervised positions per chunk of the loss (memory grows with chunk × vocabulary); by default "
            "at least 128 and, above that, as many as keep one chunk's fp32 logits within 16 MiB on CPU and 64 MiB "
            "on accelerators (at most 512)."
        },
    )

    # Where the KD sequences come from (METHODS §4)
    source: str = field(
        default="gt",
        metadata={
            "help": f"KD sequences: {', '.join(SOURCES)}. gt = the dataset; the others generate responses to the "
            "batch's prompts during training (CE stays on the dataset's responses)."
        },
    )
    mixed_lambda: float = field(
        default=0.5, metadata={"help": "source=mixed (GKD): probability that a batch's responses are the student's."}
    )
    replay_buffer_size: int = field(
        default=1000, metadata={"help": "source=adaptive (DistiLLM): generated examples kept for replay."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Longest generated response (also capped by max_length)."})
    generation_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of on-policy generation (0 = greedy)."}
    )
    generation_top_p: float = field(default=1.0, metadata={"help": "Nucleus (top-p) filter of on-policy generation."})
    generation_top_k: int = field(default=0, metadata={"help": "Top-k filter of on-policy generation (0 = none)."})
    switch_tau0: float = field(
        default=0.3, metadata={"help": "source=switch: initial JSD threshold τ0 (≥ ln 2: the teacher never writes)."}
    )
    switch_decay: float = field(default=0.1, metadata={"help": "source=switch: threshold decay λ per generated token."})
    switch_schedule: str = field(
        default="exp", metadata={"help": f"source=switch: threshold schedule, {' | '.join(SCHEDULES)}."}
    )
    speculative_draft_tokens: int = field(
        default=8,
        metadata={
            "help": "source=switch or skd: the student drafts this many tokens alone and the teacher scores them in "
            "one pass, keeping the draft up to the first token the teacher writes (exactly the token-by-token "
            "output); 0 or 1 decodes token by token."
        },
    )
    skd_top_k: int = field(
        default=25, metadata={"help": "source=skd: student tokens outside the teacher's top-K are replaced."}
    )
    mixture_alpha: float = field(
        default=0.2, metadata={"help": "source=mixture: tokens sampled from (1 - α)·student + α·teacher."}
    )

    # Teacher cache (off-policy runs)
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Folder of precomputed teacher signal: built from the teacher on the first run (train and eval "
            "data), then read instead of running the teacher, which is never loaded again. source gt only."
        },
    )
    teacher_cache_kind: str = field(
        default="hidden",
        metadata={
            "help": "hidden: last hidden states + LM head (the exact loss; any same-vocabulary objective). topk: the "
            "top teacher_cache_top_k log-probs at `temperature` (smaller; vanilla KD with fkl/jsd/skl/srkl/tvd)."
        },
    )
    teacher_cache_top_k: int = field(default=64, metadata={"help": "teacher_cache_kind=topk: ids kept per position."})

    # Evaluation during training
    eval_generation_size: int = field(
        default=0,
        metadata={
            "help": "Each evaluation also decodes greedily from the first N evaluation prompts and reports eval_rouge_l "
            "and eval_exact_match (metric_for_best_model: rouge_l picks the best checkpoint by it); 0 = loss only."
        },
    )

    # Trainer defaults that suit distillation
    output_dir: str | None = field(
        default="runs/llmdistill", metadata={"help": "Where checkpoints and the student go."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the collator needs the tokenised columns."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy: no, steps, epoch."})
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP: search the graph for parameters without a gradient after each forward. Every student "
            "parameter takes part in the loss, so the search (and its per-run warning) is off."
        },
    )

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as error:  # TrainingArguments' own checks: options the user set
            raise ConfigError(str(error)) from error
        self._check_types()
        check_options(self)

    def _check_types(self) -> None:
        """Our fields hold their declared type (a YAML value is not converted unless it is a string)."""
        for name, declared in _plain_field_types().items():
            value = getattr(self, name)
            if value is None or isinstance(value, (int, float) if declared is float else declared):
                continue
            raise ConfigError(f"{name}={value!r} must be {declared.__name__}, not {type(value).__name__}.")

    @property
    def teacher_paths(self) -> list[str]:
        """The teachers named by teacher_model_name_or_path, in order (one, or several separated by commas)."""
        return listed_teachers(self.teacher_model_name_or_path or None)

    def lora_config(self):
        """peft's LoraConfig for `use_peft`, else None."""
        if not self.use_peft:
            return None
        try:
            from peft import LoraConfig
        except ImportError as error:
            raise ImportError("use_peft needs peft: pip install 'llmdistill[peft]'.") from error
        return LoraConfig(
            task_type="CAUSAL_LM", r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules or "all-linear", modules_to_save=self.lora_modules_to_save,
        )

    def intervention(self) -> Intervention:
        """Who writes each generated token under this source."""
        return Intervention(
            RULE.get(self.source, "student"), self.switch_tau0, self.switch_decay, self.switch_schedule,
            self.skd_top_k, self.mixture_alpha,
        )

    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.generation_temperature, self.generation_top_p, self.generation_top_k)

    @property
    def uses_teacher(self) -> bool:
        return self.objective != "sft" and self.alpha_kd > 0

    @property
    def kd_scale(self) -> float:
        """Factor on the KD term: temperature² when scale_kd_by_temperature_squared, else 1."""
        return self.temperature**2 if self.scale_kd_by_temperature_squared else 1.0

    def divergence_params(self) -> dict:
        return {
            "divergence": self.divergence,
            "temperature": self.temperature,
            "beta": self.jsd_beta,
            "skew_alpha": self.skew_alpha,
            "akl_mu": self.akl_mu,
        }

    def save_yaml(self, directory: str | Path) -> Path:
        """Write the resolved configuration; `DistillConfig.from_yaml` reads it back."""
        path = Path(directory) / CONFIG_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        resolved = {key: value for key, value in self.to_dict().items() if key in _init_field_names()}
        path.write_text(yaml.safe_dump(resolved, sort_keys=False))
        return path

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> "DistillConfig":
        """Read a YAML file (optional), then apply `--field value` command-line overrides."""
        values = _read_yaml(path) if path is not None else {}
        if isinstance(values.get("teacher_model_name_or_path"), list):  # several teachers as a YAML list
            values["teacher_model_name_or_path"] = ",".join(map(str, values["teacher_model_name_or_path"]))
        parser = _OptionParser(cls, prog="llmdistill train")
        parser.set_defaults(**values)
        config, unused = parser.parse_args_into_dataclasses(args=overrides or [], return_remaining_strings=True)
        if unused:
            raise ConfigError(_unknown_option(unused[0], "command-line option", prefix="--"))
        return config


def listed_teachers(teachers) -> list:
    """The teachers given: none, one model or name, a list or tuple of them, or names separated by commas."""
    if teachers is None:
        return []
    if isinstance(teachers, str):
        return [name.strip() for name in teachers.split(",")]
    return list(teachers) if isinstance(teachers, (list, tuple)) else [teachers]


class _OptionParser(HfArgumentParser):
    """Reports a bad flag or value as a ConfigError (one line) instead of argparse's usage text and exit."""

    def error(self, message: str):
        raise ConfigError(f"{message}. See llmdistill train --help.")


@functools.cache
def _plain_field_types() -> dict[str, type]:
    """The int, float, str and bool fields declared here (not inherited), by name; `X | None` counts as X."""
    hints = typing.get_type_hints(DistillConfig)
    plain = {}
    for name in DistillConfig.__annotations__:
        kinds = [kind for kind in typing.get_args(hints[name]) or (hints[name],) if kind is not type(None)]
        if len(kinds) == 1 and kinds[0] in (int, float, str, bool):
            plain[name] = kinds[0]
    return plain


def _init_field_names() -> set[str]:
    return {f.name for f in fields(DistillConfig) if f.init}


def _unknown_option(key: str, kind: str, prefix: str = "") -> str:
    name = key.split("=", 1)[0].removeprefix(prefix)
    hint = difflib.get_close_matches(name, _init_field_names(), n=1)
    spelled = (f"{prefix}{hint[0]}" if prefix else repr(hint[0])) if hint else None
    suggestion = f" Did you mean {spelled}?" if hint else " See llmdistill train --help for the options."
    return f"unknown {kind} {key!r}.{suggestion}"


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: give the path of a YAML file (see configs/).")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', None) or error}).") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of option names to values.")
    known = _init_field_names()
    for key in values:
        if key not in known:
            raise ConfigError(f"{path}: {_unknown_option(key, 'option')}")
    return values
