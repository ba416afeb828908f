"""Command line: ``msflow-fast train | eval | predict | demo | models``.

``train`` and ``demo`` build the model named by ``--model`` (default ``msflow``; ``msflow-fast
models`` lists them), with one flag per field of its config dataclass (generated, see
:mod:`.config_flags`) and training flags whose defaults are the model's recipe. ``eval`` and
``predict`` rebuild the model a checkpoint holds.

Subcommands live in :data:`~msflow_fast.cli.commands.COMMANDS` (name -> (help, add_arguments,
run)); a new one is one more entry.
"""

from __future__ import annotations

import argparse
import sys

from .commands import COMMANDS, DEFAULT_MODEL, model_name_from_argv
from .config_flags import add_config_arguments, config_from_args, config_overrides

__all__ = ["COMMANDS", "add_config_arguments", "build_parser", "config_from_args", "config_overrides", "main"]


def build_parser(model: str = DEFAULT_MODEL) -> argparse.ArgumentParser:
    """The parser, with the config flags of the registered model ``model`` on ``train`` and ``demo``."""
    from msflow_fast import __version__

    parser = argparse.ArgumentParser(
        prog="msflow-fast",
        description="Normalizing-flow anomaly detection with fused kernels (MSFlow and more: msflow-fast models). "
        "Metrics print in percent.",
    )
    parser.add_argument("--version", action="version", version=f"msflow-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p, model)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors print one line and give 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        model = model_name_from_argv(argv)
        parser = build_parser(model)
    except ValueError as err:
        print(f"msflow-fast: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    run = COMMANDS[args.command][2]
    try:
        return run(args)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        print(f"msflow-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        checkpoint = getattr(args, "checkpoint_written", None)
        where = (
            f"the last finished epoch is in {checkpoint}; continue with --resume"
            if checkpoint is not None and checkpoint.is_file()
            else "no checkpoint was written"
        )
        print(f"msflow-fast {args.command}: interrupted ({where})", file=sys.stderr)
        return 130

