"""Command line: ``msflow-fast train | eval | predict | demo | models | pseudo-anomalies``.

``train`` and ``demo`` build the model named by ``--model`` (default ``msflow``; ``msflow-fast
models`` lists them), with one flag per field of its config dataclass (generated, see
:mod:`.config_flags`) and training flags whose defaults are the model's recipe. ``eval`` and
``predict`` rebuild the model a checkpoint holds.

Subcommands live in :data:`~msflow_fast.cli.commands.COMMANDS` (name -> (help, add_arguments,
run)); a new one is one more entry.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .commands import COMMANDS, DEFAULT_MODEL, model_name_from_argv
from .config_flags import add_config_arguments, config_from_args, config_overrides

__all__ = ["COMMANDS", "add_config_arguments", "build_parser", "config_from_args", "config_overrides", "main"]


def build_parser(model: str = DEFAULT_MODEL) -> argparse.ArgumentParser:
    """The parser, with the config flags of the registered model ``model`` on ``train`` and ``demo``."""
    from msflow_fast import __version__

    parser = argparse.ArgumentParser(
        prog="msflow-fast",
        allow_abbrev=False,
        description="Normalizing-flow anomaly detection with fused kernels (MSFlow and more: msflow-fast models). "
        "Metrics print in percent.",
    )
    parser.add_argument("--version", action="version", version=f"msflow-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parser.commands = {}
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        # No abbreviations: --model is read before parsing (it decides the flags), so --mod must not mean it.
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        add_arguments(p, model)
        parser.commands[name] = p
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, Slurm, Kubernetes) turned into the same clean stop as Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


_BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")


def _boolean_flag_with_a_value(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """``--pretrained false``: a message saying to write ``--no-pretrained`` (argparse would only say 'unrecognized')."""
    command = parser.commands.get(argv[0]) if argv else None
    if command is None:
        return None
    switches = {}
    for action in command._actions:
        if action.nargs == 0 and action.option_strings:  # store_true and --x/--no-x flags
            negative = next((o for o in action.option_strings if o.startswith("--no-")), None)
            switches.update({o: negative for o in action.option_strings if not o.startswith("--no-")})
    for flag, value in zip(argv, argv[1:]):
        if flag in switches and value.lower() in _BOOLEAN_WORDS:
            alternative = f" or {switches[flag]}" if switches[flag] else ""
            return f"{flag} takes no value: write {flag}{alternative} (not {flag} {value})"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors print one line and give 2; Ctrl-C 130, SIGTERM 143)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        model = model_name_from_argv(argv)
        parser = build_parser(model)
    except ValueError as err:
        print(f"msflow-fast: error: {err}", file=sys.stderr)
        return 2
    hint = _boolean_flag_with_a_value(parser, argv)
    if hint is not None:
        print(f"msflow-fast {argv[0]}: error: {hint}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    run = COMMANDS[args.command][2]
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        return run(args)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        print(f"msflow-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        checkpoint = getattr(args, "checkpoint_written", None)
        where = (
            f"the last finished epoch is in {checkpoint}; continue with --resume"
            if checkpoint is not None and checkpoint.is_file()
            else "no checkpoint was written"
        )
        terminated = isinstance(stop, Terminated)
        print(f"msflow-fast {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'} ({where})", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

