"""Command line: `llmdistill train [CONFIG.yaml] [--option value ...]` and `llmdistill quickstart`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import DataError, UserError, one_line
from .objectives import CROSS_TOKENIZER, OBJECTIVES
from .sources import LOCK_STEP, SOURCES

GLOBAL_FLAGS = ("--debug", "--verbose")


def main(argv: list[str] | None = None) -> None:
    """Runs a command. Input the user can fix (`UserError`) ends in one line, `llmdistill: error: ...` on stderr, and
    exit status 2; other exceptions are bugs and keep their traceback, as every error does with --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = set()
    while argv and argv[0] in GLOBAL_FLAGS:
        flags.add(argv.pop(0))
    if "--verbose" not in flags:
        _quiet_loading_bars()
    try:
        _run(argv)
    except UserError as error:
        if "--debug" in flags:
            raise
        print(f"llmdistill: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def _quiet_loading_bars() -> None:
    """transformers' and datasets' per-file bars (loading weights, writing shards, generating splits): the run's own
    progress bar is the one that says how far it is."""
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _run(argv: list[str]) -> None:
    if argv and argv[0] == "train":  # its options are DistillConfig's: HfArgumentParser reads them, not argparse
        _train(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="llmdistill", description="Distill a causal LM into a smaller one.")
    parser.add_argument("--debug", action="store_true", help="show every error's traceback (before the command)")
    parser.add_argument(
        "--verbose", action="store_true", help="show the loading bars of transformers and datasets (before the command)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train a student: llmdistill train [CONFIG.yaml] [--option value ...]")
    quickstart = commands.add_parser("quickstart", help="the offline demo: the embedded teacher distilled into an SFT and a KD student")
    quickstart.add_argument("--output-dir", default="llmdistill-quickstart", help="where everything is written")
    quickstart.add_argument("--seed", type=int, default=0, help="data, initialisation and training seed")
    quickstart.add_argument("--smoke", action="store_true", help="a seconds-long run of the same code path")
    quickstart.add_argument(
        "--student-seeds", type=int, default=None,
        help="train each student from this many seeds (seed, seed + 1, ...) and report mean ± std; default 3 (1 with "
        "--smoke)",
    )
    quickstart.add_argument(
        "--objective", choices=sorted(OBJECTIVES),
        help="how the distilled student is trained (the other student is always SFT); default vanilla, or dskd_eta "
        "with --cross-tokenizer",
    )
    quickstart.add_argument(
        "--cross-tokenizer", action="store_true",
        help="students read a SentencePiece-style tokenizer of their own while the teacher keeps its byte-level BPE",
    )
    quickstart.add_argument(
        "--source", choices=SOURCES, default="gt",
        help="where the distilled student's KD sequences come from: the dataset (gt) or generations during training "
        "(switch: the student writes and the teacher takes over where they disagree; see the README)",
    )
    quickstart.add_argument("--student-steps", type=int, help="optimizer steps per student (default 800)")
    quickstart.add_argument(
        "--teacher-embeddings", action=argparse.BooleanOptionalAction,
        help="both students start from the teacher's embeddings (projected onto their width); the default, except "
        "with --cross-tokenizer. --no-teacher-embeddings: random ones",
    )
    evaluate = commands.add_parser("eval", help="the papers' evaluation: ROUGE-L over seeds, GSM8K exact match")
    evaluate.add_argument("model", help="the model folder to evaluate")
    evaluate.add_argument("--data", nargs="+", required=True, type=Path,
                          help="JSONL files: prompt + output (MiniLLM/DSKD format) or GSM8K's question + answer")
    evaluate.add_argument("--teacher", help="teacher folder: adds held-out teacher→student KL and top-1 agreement")
    evaluate.add_argument("--seeds", nargs="+", type=int, default=[10, 20, 30, 40, 50])
    evaluate.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling at T = 1")
    evaluate.add_argument("--chat-template", action="store_true",
                          help="give each request as a user turn through the model's chat template (instruct models)")
    evaluate.add_argument("--output-dir", type=Path, help="default: MODEL/eval")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--max-prompt-length", type=int, default=256, help="prompts keep their last N tokens")
    evaluate.add_argument("--max-length", type=int, default=512, help="prompt + response tokens at most")
    evaluate.add_argument("--limit", type=int, help="only the first N prompts of each file")
    align = commands.add_parser("align", help="show how two tokenizers split a text and which tokens ETA aligns")
    align.add_argument("--teacher", required=True, help="teacher model or tokenizer: folder or hub name")
    align.add_argument("--student", required=True, help="student model or tokenizer: folder or hub name")
    source = align.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to tokenise")
    source.add_argument("--file", type=Path, help="a UTF-8 text file to tokenise")
    align.add_argument("--json", action="store_true", help="print the tokens, pairs and coverage as JSON")
    merge = commands.add_parser("merge", help="fold a trained LoRA adapter into its base model: a plain HF folder")
    merge.add_argument("adapter", help="the adapter folder a use_peft run saved")
    merge.add_argument("output", help="where the merged model and its tokenizer go")
    args = parser.parse_args(argv)
    if args.command == "merge":
        from .models import merge_adapter

        print(f"merged model written to {merge_adapter(args.adapter, args.output)}")
        return
    if args.command == "align":
        _align(args)
        return
    if args.command == "eval":
        _evaluate(args)
        return
    objective = args.objective or ("dskd_eta" if args.cross_tokenizer else "vanilla")
    if args.student_steps is not None and args.student_steps < 1:
        parser.error(f"--student-steps {args.student_steps}: train at least one step (the default is 800).")
    if args.teacher_embeddings and args.cross_tokenizer:
        parser.error("--teacher-embeddings needs the teacher's vocabulary; with --cross-tokenizer the students have "
                     "their own: drop one of the two.")
    if args.student_seeds is not None and args.student_seeds < 1:
        parser.error(f"--student-seeds {args.student_seeds}: train at least one seed (3 reports mean ± std).")
    if args.cross_tokenizer and objective not in CROSS_TOKENIZER:
        parser.error(f"--objective {objective} needs one vocabulary; with --cross-tokenizer choose one of "
                     f"{', '.join(sorted(CROSS_TOKENIZER))}.")
    if args.cross_tokenizer and args.source in LOCK_STEP:
        parser.error(f"--source {args.source} lets the teacher write single tokens, which needs one vocabulary; with "
                     "--cross-tokenizer choose gt, teacher, student, mixed or adaptive.")

    from .quickstart.run import run_quickstart

    run_quickstart(
        args.output_dir, seed=args.seed, smoke=args.smoke, objectives=("sft", objective),
        cross_tokenizer=args.cross_tokenizer, sources=(args.source,),
        student_seeds=args.student_seeds or (1 if args.smoke else 3), student_steps=args.student_steps,
        teacher_embeddings=args.teacher_embeddings,
    )


def _train(arguments: list[str]) -> None:
    from .config import DistillConfig
    from .distributed import end_distributed
    from .trainer import distill

    if "-h" in arguments or "--help" in arguments:
        from transformers import HfArgumentParser

        print("usage: llmdistill train [CONFIG.yaml] [--option value ...]\n")
        HfArgumentParser(DistillConfig).print_help()
        return
    has_file = bool(arguments) and not arguments[0].startswith("-")
    config_path, overrides = (arguments[0], arguments[1:]) if has_file else (None, arguments)
    distill(DistillConfig.from_yaml(config_path, overrides))
    end_distributed()


def _align(args: argparse.Namespace) -> None:
    from .align import alignment_summary, render_alignment
    from .models import check_model_source, load_tokenizer

    if args.file is not None and not args.file.is_file():
        raise DataError(f"--file {args.file}: no such file. Give a UTF-8 text file, or the text itself with --text.")
    text = args.text if args.text is not None else args.file.read_text(encoding="utf-8")
    check_model_source(args.teacher, "--teacher", tokenizer_only=True)
    check_model_source(args.student, "--student", tokenizer_only=True)
    teacher, student = load_tokenizer(args.teacher, field="--teacher"), load_tokenizer(args.student, field="--student")
    if args.json:
        print(json.dumps(alignment_summary(text, teacher, student), ensure_ascii=False, indent=1))
    else:
        print(render_alignment(text, teacher, student))


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation import Protocol, evaluate_model, results_markdown

    protocol = Protocol(args.max_prompt_length, args.max_length, temperature=0.0 if args.greedy else 1.0,
                        batch_size=args.batch_size, chat_template=args.chat_template)
    seeds = tuple(args.seeds[:1]) if args.greedy else tuple(args.seeds)  # greedy decoding ignores the seed
    results = evaluate_model(args.model, args.data, args.output_dir or Path(args.model) / "eval", args.teacher,
                             seeds, protocol, args.limit)
    print(results_markdown(results))
