"""DistillConfig's validation, one function per group of options, run in this order by `check_options`.

Each raises a ConfigError that names the option, its value and what to change. A rule is written as the condition
that must hold, so that NaN fails it.
"""

from __future__ import annotations

from .divergences import DIVERGENCE_ALIASES, DIVERGENCES
from .errors import ConfigError, unknown_choice
from .objectives import CROSS_TOKENIZER, OBJECTIVES
from .objectives.opd import ESTIMATORS
from .rollout import SCHEDULES
from .sources import LOCK_STEP, SOURCES
from .teacher_cache import CACHE_KINDS, TOPK_DIVERGENCES

MIXTURE_SOURCES = ("gt", "student", "mixed", "adaptive")  # several teachers score responses; none writes


def check_options(config) -> None:
    check_distillation(config)
    check_models(config)
    check_training_numbers(config)
    check_source(config)
    check_teacher_cache(config)
    if config.teacher_model_name_or_path:  # else the trainer checks the teachers it is given
        check_teacher_count(config, len(config.teacher_paths))
    check_limits(config)


def check_distillation(config) -> None:
    """The objective and the terms of its loss."""
    if config.objective != "sft" and config.objective not in OBJECTIVES:
        raise ConfigError(unknown_choice("objective", config.objective, ("sft", *OBJECTIVES)))
    if config.divergence not in DIVERGENCES:
        raise ConfigError(unknown_choice("divergence", config.divergence, DIVERGENCES, DIVERGENCE_ALIASES))
    _require(config, "alpha_kd", 0 <= config.alpha_kd <= 1, "must lie in [0, 1] (0 = CE only, 1 = KD only)")
    _require(config, "jsd_beta", 0 <= config.jsd_beta <= 1, "must lie in [0, 1] (0 = forward KL, 1 = reverse KL)")
    _require(config, "skew_alpha", 0.0 <= config.skew_alpha <= 1.0, "must lie in [0, 1]")
    _require(config, "akl_mu", 0.0 < config.akl_mu < 1.0, "must lie in (0, 1)")
    _require(config, "temperature", config.temperature > 0, "must be > 0")
    _require_choice("opd_estimator", config.opd_estimator, ESTIMATORS)
    _require_choice("dskd_s2t", config.dskd_s2t, ("closed_form", "learned"))
    _require_choice("dskd_spaces", config.dskd_spaces, ("both", "student", "teacher"))
    if config.projector_learning_rate is not None:
        _require(
            config, "projector_learning_rate", config.projector_learning_rate > 0, "must be > 0, or unset to scale it"
        )
    if config.loss_chunk_size is not None:
        _require(
            config, "loss_chunk_size", config.loss_chunk_size >= 1, "must be ≥ 1, or unset to choose automatically"
        )


def check_models(config) -> None:
    """LoRA and the dtype the models load in."""
    if config.use_peft:
        _require(config, "lora_r", config.lora_r >= 1, "must be ≥ 1")
        _require(config, "lora_alpha", config.lora_alpha > 0, "must be > 0")
        _require(config, "lora_dropout", 0 <= config.lora_dropout < 1, "must lie in [0, 1)")
    _require_choice("model_dtype", config.model_dtype, ("float32", "bfloat16", "float16", "auto"))


def check_training_numbers(config) -> None:
    """The Trainer's own numbers that it would otherwise accept and fail on mid-run."""
    _require(config, "learning_rate", config.learning_rate >= 0, "must be ≥ 0")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        _require(config, name, getattr(config, name) >= 1, "must be ≥ 1")
    if config.max_steps <= 0:
        _require(config, "num_train_epochs", config.num_train_epochs > 0, "must be > 0 when max_steps is unset")


def check_source(config) -> None:
    """Where the KD sequences come from, and how they are generated."""
    if config.source not in SOURCES:
        raise ConfigError(unknown_choice("source", config.source, SOURCES))
    if config.source != "gt" and not config.uses_teacher:
        raise ConfigError(
            f"source={config.source!r} trains KD on generated responses, which needs a teacher: choose an "
            "objective other than 'sft' and alpha_kd > 0, or source='gt'."
        )
    if config.objective == "opd" and config.source in ("gt", "teacher"):
        raise ConfigError(
            f"objective='opd' is a policy gradient on the tokens the student sampled, so it needs a source in "
            f"which the student writes (student, mixed, adaptive, switch, skd, mixture), not source={config.source!r}."
        )
    if config.source in LOCK_STEP and config.objective in CROSS_TOKENIZER:
        raise ConfigError(
            f"source={config.source!r} lets the teacher write single tokens of the student's response, which needs "
            f"one vocabulary; cross-tokenizer objective {config.objective!r} works with source gt, teacher, "
            "student, mixed or adaptive."
        )
    _require(config, "mixed_lambda", 0.0 <= config.mixed_lambda <= 1.0, "must lie in [0, 1]")
    _require(config, "replay_buffer_size", config.replay_buffer_size >= 1, "must be ≥ 1")
    _require(config, "max_new_tokens", config.max_new_tokens >= 1, "must be ≥ 1")
    _require(config, "generation_temperature", config.generation_temperature >= 0, "must be ≥ 0 (0 = greedy)")
    _require(config, "generation_top_p", 0 < config.generation_top_p <= 1, "must lie in (0, 1]")
    _require(config, "generation_top_k", config.generation_top_k >= 0, "must be ≥ 0 (0 = no top-k filter)")
    _require_choice("switch_schedule", config.switch_schedule, SCHEDULES)
    _require(config, "switch_tau0", config.switch_tau0 >= 0, "must be ≥ 0")
    _require(config, "switch_decay", config.switch_decay >= 0, "must be ≥ 0")
    _require(config, "skd_top_k", config.skd_top_k >= 1, "must be ≥ 1")
    _require(
        config, "speculative_draft_tokens", config.speculative_draft_tokens >= 0, "must be ≥ 0 (0 = token by token)"
    )
    _require(config, "mixture_alpha", 0 <= config.mixture_alpha <= 1, "must lie in [0, 1]")


def check_teacher_cache(config) -> None:
    if config.teacher_cache is None:
        return
    _require_choice("teacher_cache_kind", config.teacher_cache_kind, CACHE_KINDS)
    if not reads_teacher_cache(config.objective, config.source, config.alpha_kd):
        raise ConfigError(
            "teacher_cache holds the teacher's signal on the dataset's own responses for one vocabulary: it needs "
            f"source='gt' (not {config.source!r}), alpha_kd > 0 and a same-vocabulary objective (vanilla, dskd, "
            f"dskd_v1; not {config.objective!r}). Unset teacher_cache for this run."
        )
    if config.teacher_cache_kind == "topk":
        if config.objective != "vanilla" or config.divergence not in TOPK_DIVERGENCES:
            raise ConfigError(
                "teacher_cache_kind='topk' keeps only the teacher's top-k probabilities (p = 0 elsewhere): it "
                f"works with objective 'vanilla' and divergence {', '.join(TOPK_DIVERGENCES)} (got "
                f"{config.objective!r}, {config.divergence!r}). Use teacher_cache_kind='hidden' for the others."
            )
        _require(config, "teacher_cache_top_k", config.teacher_cache_top_k >= 1, "must be ≥ 1")


def reads_teacher_cache(objective: str, source: str, alpha_kd: float) -> bool:
    """Whether a run can read the teacher from a `teacher_cache`: it distils (alpha_kd > 0) on the dataset's own
    responses (source gt) with a same-vocabulary objective."""
    return objective != "sft" and alpha_kd > 0 and source == "gt" and objective not in CROSS_TOKENIZER


def check_teacher_count(config, count: int) -> None:
    """What several teachers need: a column to route by or none (the average), objective vanilla, a source in which
    no teacher writes, no teacher cache."""
    several = count > 1
    if config.teacher_routing_column is not None and not several:
        raise ConfigError(
            f"teacher_routing_column={config.teacher_routing_column!r} routes rows between several teachers: list "
            "them in teacher_model_name_or_path (comma-separated), or unset teacher_routing_column."
        )
    if not several or not config.uses_teacher:
        return
    if count == len(config.teacher_paths) and "" in config.teacher_paths:
        raise ConfigError(f"teacher_model_name_or_path={config.teacher_model_name_or_path!r} has an empty name.")
    supported = {"objective": ("vanilla",), "source": ("gt",) if config.teacher_routing_column else MIXTURE_SOURCES}
    for name, allowed in supported.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(
                f"{name}={getattr(config, name)!r} is not supported with several teachers"
                f"{' routed by a column' if config.teacher_routing_column else ''}: use {name} "
                f"{' or '.join(map(repr, allowed))}, or one teacher."
            )
    if config.teacher_cache is not None or config.teacher_tokenizer_name_or_path is not None:
        field = "teacher_cache" if config.teacher_cache is not None else "teacher_tokenizer_name_or_path"
        held = "signal" if field == "teacher_cache" else "tokenizer"
        raise ConfigError(
            f"{field}={getattr(config, field)!r} holds one teacher's {held}, not several: unset it, or list one "
            "teacher."
        )


def check_limits(config) -> None:
    """How many evaluation prompts are decoded, and how long rows may be."""
    _require(config, "eval_generation_size", config.eval_generation_size >= 0, "must be ≥ 0 (0 = loss only)")
    _require(config, "max_prompt_length", config.max_prompt_length >= 1, "must be ≥ 1")
    _require(
        config, "max_length", config.max_length > config.max_prompt_length,
        f"must exceed max_prompt_length={config.max_prompt_length} so that every example keeps a response token",
    )


def _require(config, field: str, holds: bool, rule: str) -> None:
    """Raise ConfigError `field=value rule.` unless `holds`."""
    if not holds:
        raise ConfigError(f"{field}={getattr(config, field)!r} {rule}.")


def _require_choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(unknown_choice(field, value, choices))
