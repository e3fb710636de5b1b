"""Command line: `llmdistill train CONFIG.yaml [--option value ...]` and `llmdistill quickstart`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="llmdistill", description="Distill a causal LM into a smaller one.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", add_help=False, help="train a student from a YAML config; `--option value` overrides any key"
    )
    train.add_argument("config", nargs="?", help="YAML file of DistillConfig options")

    quickstart = commands.add_parser("quickstart", help="the offline demo: teacher, SFT student, KD student")
    quickstart.add_argument("--output-dir", default="llmdistill-quickstart", help="where everything is written")
    quickstart.add_argument("--seed", type=int, default=0, help="data, initialisation and training seed")
    quickstart.add_argument("--smoke", action="store_true", help="a seconds-long run of the same code path")

    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        _train(args.config, rest)
    elif rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    else:
        from .quickstart.run import run_quickstart

        run_quickstart(args.output_dir, seed=args.seed, smoke=args.smoke)


def _train(config_path: str | None, overrides: list[str]) -> None:
    from .config import DistillConfig
    from .trainer import distill

    if config_path in ("-h", "--help") or "-h" in overrides or "--help" in overrides:
        from transformers import HfArgumentParser

        HfArgumentParser(DistillConfig).print_help()
        return
    if config_path is not None and config_path.startswith("--"):
        overrides, config_path = [config_path, *overrides], None
    distill(DistillConfig.from_yaml(config_path, overrides))
