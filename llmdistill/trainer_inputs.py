"""What a DistillTrainer reads before it trains: the model sources checked, the student's and teacher's tokenizers,
and the training and evaluation data tokenised for them (routed to several teachers, numbered into a teacher
cache)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .config import DistillConfig
from .data import CACHE_INDEX_COLUMN, load_raw_dataset, prepare_dataset, resolve_format
from .errors import ConfigError, DataError
from .models import check_model_source, load_tokenizer, same_tokenizer_files
from .objectives import CROSS_TOKENIZER, NEEDS_MINED_PAIRS
from .teachers import TEACHER_INDEX_COLUMN, route_indices
from .vocab import VocabBridge


def check_model_sources(args: DistillConfig, student, teachers: list) -> None:
    """Every model and tokenizer named by a path or hub name exists, before anything is loaded."""
    named = [
        ("student_model_name_or_path", student),
        *(("teacher_model_name_or_path", teacher) for teacher in teachers),
        ("student_tokenizer_name_or_path", args.student_tokenizer_name_or_path),
        ("teacher_tokenizer_name_or_path", args.teacher_tokenizer_name_or_path if args.uses_teacher else None),
    ]
    for field, source in named:
        if isinstance(source, str):
            check_model_source(source, field, args.trust_remote_code, tokenizer_only="tokenizer" in field)


def load_tokenizers(args: DistillConfig, student, teachers: list, processing_class, teacher_processing_class):
    """(student tokenizer, teacher tokenizer, VocabBridge between them); the teacher's two are None without a
    teacher. A same-vocabulary objective refuses teachers whose tokens differ from the student's."""
    tokenizer = processing_class or _load_role_tokenizer(args, student, "student")
    if not args.uses_teacher:
        return tokenizer, None, None
    teacher_tokenizer = teacher_processing_class or _teacher_tokenizer(
        args, teachers[0], student, tokenizer if processing_class is None else None
    )
    bridge = VocabBridge.between(teacher_tokenizer, tokenizer)
    if args.objective not in CROSS_TOKENIZER:
        _check_same_tokens(args.objective, bridge, teacher_tokenizer, tokenizer)
    for other in teachers[1:]:  # several teachers: each reads the student's vocabulary
        other_tokenizer = teacher_processing_class or _load_role_tokenizer(args, other, "teacher")
        _check_same_tokens(args.objective, VocabBridge.between(other_tokenizer, tokenizer), other_tokenizer, tokenizer)
    return tokenizer, teacher_tokenizer, bridge


def _load_role_tokenizer(args: DistillConfig, model, role: str) -> PreTrainedTokenizerBase:
    """The `role` ("student" or "teacher") tokenizer: its own option if set, else the model's folder or name."""
    source, field = _tokenizer_source(args, model, role)
    return load_tokenizer(source, args.trust_remote_code, field=field)


def _teacher_tokenizer(args: DistillConfig, teacher, student, student_tokenizer) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer; the student's object itself (loaded from its files, or None) when both folders hold
    the same tokenizer files: a second copy of a 150k-token vocabulary costs about 100 MB."""
    if student_tokenizer is not None and same_tokenizer_files(
        _tokenizer_source(args, teacher, "teacher")[0], _tokenizer_source(args, student, "student")[0]
    ):
        return student_tokenizer
    return _load_role_tokenizer(args, teacher, "teacher")


def _tokenizer_source(args: DistillConfig, model, role: str) -> tuple[str, str]:
    """(where the `role` tokenizer is, the option that says so)."""
    explicit = getattr(args, f"{role}_tokenizer_name_or_path")
    source = explicit or (model if isinstance(model, str) else getattr(model, "name_or_path", None))
    if not source:
        raise ConfigError(
            f"cannot find the {role} tokenizer: pass it (processing_class / teacher_processing_class) or set "
            f"{role}_tokenizer_name_or_path."
        )
    return source, f"{role}_tokenizer_name_or_path" if explicit else f"{role}_model_name_or_path"


def _check_same_tokens(objective: str, bridge: VocabBridge, teacher_tokenizer, student_tokenizer) -> None:
    if not bridge.same_vocabulary:
        raise ConfigError(
            f"objective {objective!r} needs teacher and student to share one vocabulary, but their tokenizers "
            f"differ ({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens, or the same tokens with "
            "different ids). Use a cross-tokenizer objective (dskd_eta, uld, mined, cma, simple_ctkd; see the "
            "README's method table) or give both models the same tokenizer."
        )


def tokenised_datasets(args: DistillConfig, train_dataset, eval_dataset, tokenizer, teacher_tokenizer, teachers: list):
    """The training and (if any) evaluation data, tokenised (`_tokenised`): for the teacher too under a
    cross-tokenizer objective, each row with its teacher under teacher_routing_column, numbered into the teacher
    cache under teacher_cache."""
    teacher_view = teacher_tokenizer if args.objective in CROSS_TOKENIZER else None
    routes = _teacher_names(teachers) if args.teacher_routing_column and args.uses_teacher else None
    train_dataset = _tokenised(
        train_dataset, args.dataset_name_or_path, args.dataset_train_split, args, tokenizer, "train", teacher_view,
        routes,
    )
    if eval_dataset is not None or args.eval_dataset_name_or_path or args.dataset_eval_split:
        eval_dataset = _tokenised(
            eval_dataset,
            args.eval_dataset_name_or_path or args.dataset_name_or_path,
            "train" if args.eval_dataset_name_or_path else args.dataset_eval_split,
            args,
            tokenizer,
            "eval",
            teacher_view,
            routes,
        )
    if args.teacher_cache and args.uses_teacher:
        train_dataset = _with_cache_index(train_dataset, 0)
        eval_dataset = _with_cache_index(eval_dataset, len(train_dataset))
    return train_dataset, eval_dataset


def _tokenised(dataset, source: str | None, split: str, args: DistillConfig, tokenizer, name: str,
               teacher_tokenizer=None, teacher_names: list[str] | None = None):
    """`dataset`, or the one `source` names, tokenised (`tokenise`); errors in a named file name its option.
    With `teacher_names` each row carries its teacher's index, read from args.teacher_routing_column."""
    if dataset is not None:
        return tokenise(_routed(dataset, args, teacher_names), args, tokenizer, name, teacher_tokenizer)
    if not source:
        raise ConfigError(f"no {name} data: pass {name}_dataset= or set dataset_name_or_path.")
    field = "eval_dataset_name_or_path" if source == args.eval_dataset_name_or_path else "dataset_name_or_path"
    dataset = load_raw_dataset(source, split, args.dataset_config_name, field=field)
    try:
        return tokenise(_routed(dataset, args, teacher_names), args, tokenizer, name, teacher_tokenizer)
    except DataError as error:
        raise DataError(f"{field}={source!r}: {error}") from error


def tokenise(dataset, args: DistillConfig, tokenizer, name: str, teacher_tokenizer=None):
    """Raw rows tokenised for the student (and, for cross-tokenizer objectives, for the teacher, with the token
    pairs the objective compares); already tokenised rows are checked for the columns the objective needs."""
    needed = {"input_ids", "labels"} | (set(_cross_columns(args.objective)) if teacher_tokenizer else set())
    if {"input_ids", "labels"} <= set(dataset.column_names):
        missing = needed - set(dataset.column_names)
        if missing:
            raise DataError(
                f"the pre-tokenised {name} data lacks {sorted(missing)}, which objective {args.objective!r} needs: "
                "pass the raw rows (prompt/response or messages) and let the trainer tokenise them for both models."
            )
        return dataset
    fmt = resolve_format(dataset.column_names, args.prompt_column, args.response_column, args.messages_column)
    return prepare_dataset(
        dataset, tokenizer, fmt, args.max_prompt_length, args.max_length, args.drop_overlong_prompts, name,
        teacher_tokenizer, pairings=("mined",) if args.objective in NEEDS_MINED_PAIRS else (),
    )


def _cross_columns(objective: str) -> tuple[str, ...]:
    pairs = ("aligned_pairs", "mined_pairs") if objective in NEEDS_MINED_PAIRS else ("aligned_pairs",)
    return ("teacher_input_ids", "teacher_labels", *pairs)


def _routed(dataset, args: DistillConfig, teacher_names: list[str] | None):
    """`dataset` with each row's teacher index (TEACHER_INDEX_COLUMN) read from args.teacher_routing_column."""
    if teacher_names is None or dataset is None or TEACHER_INDEX_COLUMN in dataset.column_names:
        return dataset
    column = args.teacher_routing_column
    if column not in dataset.column_names:
        raise DataError(
            f"teacher_routing_column={column!r} is not a column of the data (it has {dataset.column_names}): name "
            "the column that says which teacher each row goes to."
        )
    return dataset.add_column(TEACHER_INDEX_COLUMN, route_indices(dataset[column], teacher_names, column))


def _teacher_names(teachers: list) -> list[str]:
    return [teacher if isinstance(teacher, str) else teacher.name_or_path for teacher in teachers]


def _with_cache_index(dataset, first: int):
    """The rows numbered in order from `first`: their places in the teacher cache."""
    if dataset is None or CACHE_INDEX_COLUMN in dataset.column_names:
        return dataset
    return dataset.add_column(CACHE_INDEX_COLUMN, list(range(first, first + len(dataset))))
