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


def _load_command(module_name: str, attr: str | None):
    """The object with ``add_arguments``/``run`` of one subcommand; ``None`` if its module is absent."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None  # that part of the package is not built yet
        raise
    return getattr(module, attr) if attr else module


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``command`` given: only that subcommand's module is imported.

    Every subcommand is listed (for ``--help``) from :data:`_COMMANDS` alone; a subcommand's
    arguments come from its module, imported only when it is the one run (``None``: all), so
    ``w4a8moe inspect`` does not load the converter or the model code.
    """
    parser = argparse.ArgumentParser(prog="w4a8moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, attr, help_text) in _COMMANDS.items():
        target = _load_command(module_name, attr) if command in (None, name) else False
        if target is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        if target:
            target.add_arguments(p)
            p.set_defaults(_run=target.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``w4a8moe`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in _COMMANDS else "").parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except W4A8MoEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
