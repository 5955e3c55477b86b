"""The `dvd` command. Subcommands live in their own modules and are imported only when used,
so `dvd --help` stays fast and no subcommand pays for another's imports."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module has `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("dvd.generate_cmd", "run vision half -> BF16 features -> language half in one process"),
    "make-checkpoint": ("dvd.make_checkpoint", "write a random-weight InternVL checkpoint (tiny or 1B-shaped)"),
    "bench": ("benchmarks.cli", "run a benchmark and print its figures"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvd",
        description="DvD: disaggregated serving of InternVL3.5 (vision server -> BF16 features -> language server).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
