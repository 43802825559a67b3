"""The ``w4a8moe`` command: thin argument parsing over the package's functions.

Subcommands live next to the code they drive; each module in ``_COMMANDS`` exposes
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from w4a8moe.errors import W4A8MoEError

_COMMANDS = {
    "inspect": ("w4a8moe.formats.commands", "inspect", "show format, clip flag, layers, experts and sizes"),
    "verify": ("w4a8moe.formats.commands", "verify", "fully validate a checkpoint (exit 0 when sound)"),
    "convert": ("w4a8moe.convert.command", None, "convert a Hugging Face MoE checkpoint to W4A8"),
    "generate": ("w4a8moe.models.command", "generate", "generate text with a W4A8 checkpoint"),
    "eval": ("w4a8moe.eval.command", None, "compare checkpoints' accuracy against the source model"),
    "serve": ("w4a8moe.integrations.vllm.serve", None, "serve a checkpoint with vLLM's OpenAI-compatible server"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand whose module is present."""
    parser = argparse.ArgumentParser(prog="w4a8moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, attr, help_text) in _COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that part of the package is not built yet
            raise
        target = getattr(module, attr) if attr else module
        p = sub.add_parser(name, help=help_text, description=help_text)
        target.add_arguments(p)
        p.set_defaults(_run=target.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``w4a8moe`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except W4A8MoEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
