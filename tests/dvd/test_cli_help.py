"""`dvd COMMAND --help` explains every option and what leaving it out gives, for a user new to DvD."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dvd.cli import COMMANDS, command_parser, main


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.help != argparse.SUPPRESS]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_says_what_it_does_and_its_default(name: str) -> None:
    _, parser = command_parser(name)
    formatter = parser._get_formatter()
    for action in _options(parser):
        flag = "/".join(action.option_strings) or action.dest
        shown = formatter._expand_help(action) if action.help is not None else ""
        assert shown.strip(), f"dvd {name} {flag}: no help"
        default = action.default
        if action.option_strings and default is not None and default is not False and default not in ("", []):
            assert _says_default(shown, default), f"dvd {name} {flag}: default {default!r} not said"


def _says_default(shown: str, default: object) -> bool:
    value = f"{default:g}" if isinstance(default, float) else str(default)
    return "default" in shown or f"({value})" in shown


def test_a_default_the_help_leaves_out_is_added_once() -> None:
    _, parser = command_parser("generate")
    text = " ".join(parser.format_help().split())
    assert "most tokens to generate (default 64)" in text  # added by the formatter
    assert "0 means greedy (default)" in text and "(default 0.0)" not in text  # the help says it: nothing added


@pytest.mark.parametrize("name", ["vision", "language", "serve", "gateway", "launch", "download"])
def test_a_log_level_logging_does_not_know_is_a_usage_error(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([name, "--log-level", "LOUD"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --log-level: invalid choice: 'LOUD'" in err and "Traceback" not in err
    _, parser = command_parser(name)
    level = next(a for a in parser._actions if "--log-level" in a.option_strings)
    assert level.type("debug") == "DEBUG" and "DEBUG" in level.choices  # any case, as logging takes it


def test_make_checkpoint_into_a_place_it_cannot_write_is_one_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    assert main(["make-checkpoint", "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {taken}: File exists\n", err
