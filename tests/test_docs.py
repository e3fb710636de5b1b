"""The README and docs/ stay true to the repository: every relative link (and #anchor) resolves, and every
`llmdistill ...` command in their code blocks is accepted by the command line's parser (nothing is run)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
INLINE_CODE = re.compile(r"`+[^`]*`+")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
PLACEHOLDER = re.compile(r"\.\.\.|…|<[A-Za-z][\w-]*>")
SEPARATORS = {"&&", "||", ";", "|", "&"}


# --- reading a page -------------------------------------------------------------------------------------------------


def split_page(text: str) -> tuple[list[str], list[list[str]]]:
    """The page's prose lines (code blocks blanked) and its fenced code blocks, each a list of lines."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
            prose.append("")
            continue
        if block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, every character but letters, digits, spaces,
    hyphens and underscores dropped, spaces turned into hyphens (no collapsing)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis markers (underscores inside words stay)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown page, with GitHub's -1, -2 suffixes for repeated headings."""
    prose, _ = split_page(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline, image and reference-style link outside code."""
    prose, _ = split_page(text)
    found = []
    for number, line in enumerate(prose, 1):
        bare = INLINE_CODE.sub("", line)
        found += [(number, target) for target in INLINE_LINK.findall(bare)]
        reference = REFERENCE_LINK.match(bare)
        if reference:
            found.append((number, reference.group(1)))
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        where = f"{page.relative_to(root)}:{number}: {target}"
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / unquote(path_part)).resolve() if path_part else page
        if root not in destination.parents and destination != root:
            problems.append(f"{where} leaves the repository")
            continue
        if not destination.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and destination.suffix == ".md" and unquote(anchor) not in anchors(destination):
            problems.append(f"{where}: no heading with anchor #{anchor} in {destination.relative_to(root)}")
    return problems


# --- commands -------------------------------------------------------------------------------------------------------


def commands(block: list[str]) -> list[tuple[list[str], str | None]]:
    """The `llmdistill` commands of a code block as argument lists (after `llmdistill`), each with the error line the
    block shows right after it (`llmdistill: error: ...`), or None. Lines continued with a backslash are joined;
    `$ ` prompts, environment assignments, comments and commands chained with && or ; are handled; a command with a
    placeholder (`...`, `<name>`) is skipped."""
    lines, pending = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    found = []
    for index, line in enumerate(lines):
        stripped = line.strip().removeprefix("$ ")
        if "llmdistill" not in stripped or stripped.startswith("llmdistill:"):
            continue
        following = next((later.strip() for later in lines[index + 1:] if later.strip()), "")
        expected = following if following.startswith("llmdistill: error:") else None
        lexer = shlex.shlex(stripped, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            arguments = _llmdistill_arguments(segment)
            segment = []
            if arguments is not None and not any(PLACEHOLDER.search(argument) for argument in arguments):
                found.append((arguments, expected))
    return found


def _llmdistill_arguments(tokens: list[str]) -> list[str] | None:
    """The arguments given to llmdistill by one simple command: `llmdistill ARGS`, `VAR=x llmdistill ARGS`, or a
    launcher's `... -m llmdistill ARGS` (torchrun, accelerate launch, python)."""
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        tokens = tokens[1:]
    if tokens[:1] == ["llmdistill"]:
        return tokens[1:]
    for index, token in enumerate(tokens[:-1]):
        if token == "-m" and tokens[index + 1] == "llmdistill":
            return tokens[index + 2:]
    return None


class _Accepted(Exception):
    pass


def parse_command(arguments: list[str], monkeypatch) -> str | None:
    """None when the command line accepts `llmdistill ARGUMENTS`, else its error. Nothing is trained, evaluated or
    loaded: `train`'s options are read into a DistillConfig (its checks included) as `llmdistill train` reads them;
    the other commands go through the CLI's own parser and checks, and stop where the work would begin."""
    from llmdistill import cli
    from llmdistill.config import DistillConfig
    from llmdistill.errors import UserError, one_line

    arguments = list(arguments)
    while arguments and arguments[0] in cli.GLOBAL_FLAGS:
        arguments.pop(0)
    if arguments[:1] == ["train"]:
        options = arguments[1:]
        if "-h" in options or "--help" in options:
            return None
        has_file = bool(options) and not options[0].startswith("-")
        config, overrides = (options[0], options[1:]) if has_file else (None, options)
        monkeypatch.chdir(ROOT)  # config paths in the docs are relative to the repository
        try:
            DistillConfig.from_yaml(config, overrides)
        except UserError as error:
            return f"llmdistill: error: {one_line(error)}"
        return None

    import llmdistill.models
    import llmdistill.quickstart.run

    def accept(*args, **kwargs):
        raise _Accepted

    for owner, name in ((cli, "_align"), (cli, "_evaluate"), (llmdistill.models, "merge_adapter"),
                        (llmdistill.quickstart.run, "run_quickstart")):
        monkeypatch.setattr(owner, name, accept)
    def error(parser, message):
        raise _Rejected(f"{parser.prog}: error: {message}")

    monkeypatch.setattr(argparse.ArgumentParser, "error", error)
    try:
        cli._run(arguments)
    except _Accepted:
        return None
    except _Rejected as rejected:
        return str(rejected)
    except SystemExit as exit:  # --help
        return None if exit.code in (0, None) else f"exit status {exit.code}"
    return "the command ran to its end without reaching its work (the test's stand-ins were not called)"


class _Rejected(Exception):
    pass


# --- the tests ------------------------------------------------------------------------------------------------------


def test_pages_exist():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 1


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def _shown_commands():
    for page in PAGES:
        _, blocks = split_page(page.read_text(encoding="utf-8"))
        for block in blocks:
            for arguments, expected in commands(block):
                yield page, arguments, expected


SHOWN = list(_shown_commands())


def test_pages_show_commands():
    assert len(SHOWN) >= 10
    assert any(arguments[:1] == ["train"] for _, arguments, _ in SHOWN)


@pytest.mark.parametrize(
    "page, arguments, expected", SHOWN,
    ids=[f"{page.relative_to(ROOT).as_posix()}: llmdistill {' '.join(arguments)}"[:150] for page, arguments, _ in SHOWN],
)
def test_commands_are_accepted(page, arguments, expected, monkeypatch):
    """A command shown alone must parse; one shown with the error line after it must fail with that line (train) or
    at least fail (the other commands, whose argparse messages carry a usage text)."""
    error = parse_command(arguments, monkeypatch)
    if expected is None:
        assert error is None, f"{page.name}: llmdistill {shlex.join(arguments)}\n{error}"
    elif [argument for argument in arguments if argument not in ("--debug", "--verbose")][:1] == ["train"]:
        assert error == expected
    else:
        assert error is not None


# --- the checks themselves can fail ---------------------------------------------------------------------------------


def test_checks_catch_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Loss and `alpha_kd` (α)\n## Twice\n## Twice\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n"
        "[fine](docs/other.md#loss-and-alpha_kd-α) [again](docs/other.md#twice-1) [self](#title) [web](https://x.y/z)\n"
        "[gone](docs/missing.md) [bad anchor](docs/other.md#nowhere) [outside](../elsewhere.md)\n"
        "`[in code](docs/missing.md)`\n\n```\n[in a block](docs/missing.md)\n```\n"
    )
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 3, problems
    assert "docs/missing.md: no such file" in problems[0]
    assert "#nowhere" in problems[1] and "leaves the repository" in problems[2]


def test_slugs_follow_github():
    assert github_slug("Claims on real models") == "claims-on-real-models"
    assert github_slug("On-policy distillation and SWITCH") == "on-policy-distillation-and-switch"
    assert github_slug("Dual-space KD (DSKD)") == "dual-space-kd-dskd"
    assert github_slug("Beside TRL: speed and memory") == "beside-trl-speed-and-memory"
    assert github_slug("`teacher_cache_kind`: hidden or top-k") == "teacher_cache_kind-hidden-or-top-k"
    assert github_slug("A — B") == "a--b"


def test_commands_are_found_and_judged(monkeypatch):
    block = [
        "pip install -e . && llmdistill quickstart --student-seeds 1   # comment",
        "OMP_NUM_THREADS=1 llmdistill train configs/vanilla_kd.yaml \\",
        "    --divergence jsd --alpha_kd 0.3",
        "torchrun --nproc_per_node 2 -m llmdistill train configs/vanilla_kd.yaml --use_cpu true",
        "llmdistill train configs/vanilla_kd.yaml --student_model_name_or_path ...",
        "$ llmdistill train configs/vanilla_kd.yaml --objective vanila",
        "llmdistill: error: objective='vanila' is unknown",
    ]
    found = commands(block)
    assert [arguments[:2] for arguments, _ in found] == [["quickstart", "--student-seeds"], ["train", "configs/vanilla_kd.yaml"],
                                                        ["train", "configs/vanilla_kd.yaml"], ["train", "configs/vanilla_kd.yaml"]]
    assert found[1][0][2:] == ["--divergence", "jsd", "--alpha_kd", "0.3"]
    assert found[3][1] == "llmdistill: error: objective='vanila' is unknown"
    for arguments, expected in found[:3]:
        assert parse_command(arguments, monkeypatch) is None, arguments
    for bad in (["train", "configs/vanilla_kd.yaml", "--no_such_option", "1"], ["train", "configs/vanilla_kd.yaml",
                "--alpha_kd", "two"], ["train", "configs/missing.yaml"], ["quickstart", "--no-such-flag"],
                ["eval", "runs/model"], ["quickstart", "--cross-tokenizer", "--source", "switch"], ["align", "--text", "x"],
                ["fly"]):
        assert parse_command(bad, monkeypatch) is not None, bad
    assert parse_command(["eval", "runs/model", "--data", "a.jsonl", "--greedy"], monkeypatch) is None
    assert parse_command(["merge", "runs/lora", "runs/merged"], monkeypatch) is None
