"""Errors the user can fix: bad options, data, model paths, caches. Each message names the field (and the file and
line where there is one) and the fix. The CLI prints them as one line and exits with status 2; any other exception is
a bug and keeps its traceback."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class UserError(Exception):
    """Input that cannot be used as given; the message says where it is and how to fix it."""


class ConfigError(UserError, ValueError):
    """An option (CLI flag, YAML key or DistillConfig field) is unknown, out of range or contradicts another."""


class DataError(UserError, ValueError):
    """A dataset file or its rows cannot be trained or evaluated on as given."""


class ModelError(UserError, ValueError):
    """A model or tokenizer cannot be found, loaded or used (e.g. it produces non-finite values)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged: the loss became NaN or inf while the teacher's outputs stayed finite."""


class CacheError(UserError, ValueError):
    """A teacher cache folder is missing its files or was built for another run."""


def unknown_choice(field: str, value: object, choices: Iterable[str], aliases: dict[str, str] | None = None) -> str:
    """`field='valeu' is unknown: choose one of a, b, c. Did you mean 'value'?`; `aliases` maps names other tools use
    to ours, which beats the closest spelling."""
    choices = list(choices)
    close = [aliases[value]] if aliases and value in aliases else difflib.get_close_matches(str(value), choices, n=1)
    suggestion = f" Did you mean {close[0]!r}?" if close else ""
    return f"{field}={value!r} is unknown: choose one of {', '.join(choices)}.{suggestion}"


def one_line(error: BaseException) -> str:
    """The error's message with line breaks and runs of spaces folded, for a one-line report."""
    return " ".join(str(error).split())


def first_line(error: BaseException) -> str:
    """The first line of an error's message (library errors often add paragraphs of advice)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".yaml", ".yml", ".safetensors", ".bin")


def is_hub_name(name: str) -> bool:
    """Whether `name` could be a hub repository id ('name' or 'org/name'), not only a local path that is missing."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith(DATA_FILE_SUFFIXES):
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and ".." not in name and "--" not in name
