"""The `dvd` command. Subcommands live in their own modules and are imported only when used,
so `dvd --help` stays fast and no subcommand pays for another's imports."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dvd.named import load

# name -> (module, one-line help). Each module has `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("dvd.pipeline.generate_cmd", "run vision half -> BF16 features -> language half in one process"),
    "make-checkpoint": ("dvd.tools.make_checkpoint", "write a random-weight InternVL checkpoint (tiny or 1B-shaped)"),
    "vision": ("dvd.vision_server.cli", "serve the vision half (ViT + MLP + ViR) over gRPC, pushing features"),
    "language": ("dvd.language_server.cli", "serve the language half (LLM engine) over gRPC, receiving features"),
    "serve": ("dvd.deploy.serve_cmd", "serve a model: gateway (OpenAI HTTP + gRPC) with vision and language servers"),
    "gateway": ("dvd.deploy.gateway_cmd", "a gateway (OpenAI HTTP + gRPC) before servers on any node, by address"),
    "launch": ("dvd.deploy.launch_cmd", "start this node's roles (gateway, vision, language) from a cluster config"),
    "cluster": ("dvd.deploy.cluster_cmd", "run the roles as Ray actors placed by resources: up, status, down"),
    "client": ("dvd.pipeline.client_cmd", "send a chat request to a running gateway over gRPC"),
    "bench": ("dvd.benchmarks.cli", "run a benchmark and print its figures"),
    "plan": ("dvd.deploy.plan", "plan a deployment: weights per half, devices, KV capacity in tokens, largest batch"),
    "doctor": ("dvd.deploy.doctor", "check this node: versions, devices, attention kernels, correctness, speed"),
    "download": ("dvd.deploy.download_cmd", "fetch a Hub checkpoint (or one role's half) into the Hub cache"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each option's help ends with its default where the help does not say it
    already, so `dvd COMMAND --help` tells a new user what they get by leaving a flag out."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default in ("", [], argparse.SUPPRESS)
                or "default" in text or f"({_shown(default)})" in text):
            return text
        return f"{text} (default {_shown(default).replace('%', '%%')})".lstrip()


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvd",
        description="DvD: disaggregated serving of InternVL3.5 (vision server -> BF16 features -> language server).",
        epilog="Run `dvd COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        top_level_parser().parse_args(argv)  # prints help or a usage error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module, parser = command_parser(name)
    return int(module.run(parser.parse_args(rest)) or 0)


def command_parser(name: str) -> tuple[Any, argparse.ArgumentParser]:
    """The subcommand's module (imported now) and its parser, as `dvd NAME` runs it."""
    module_name, help_text = COMMANDS[name]
    module = load(module_name)
    parser = argparse.ArgumentParser(prog=f"dvd {name}", description=(module.__doc__ or help_text).strip(),
                                     formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return module, parser


if __name__ == "__main__":
    sys.exit(main())
