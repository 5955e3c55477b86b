"""Frozen config dataclasses from YAML (or JSON) mappings and back, validated once with errors that
name the key.

One function builds any of DvD's config dataclasses from a nested mapping: unknown keys are refused
naming the key and the allowed ones, values of the wrong type naming the type expected, and a value
the dataclass's own check refuses (its `__post_init__` raises ValueError) naming the key path. The
same dataclasses are what the servers run with, so a config file says exactly what a process gets.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or section is wrong; the message names the key (`vision.max_batch_tiles`)."""


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))


def _convert(value: Any, kind: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _convert(value, options[0], where) if len(options) == 1 else value
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is Path:
        if not isinstance(value, (str, Path)):  # a spec's own configs hand Paths on
            raise ConfigError(f"{where}: expected a path, got {type(value).__name__} {value!r}")
        return Path(value)
    if kind in (int, float, str, bool) and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {_name(kind)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str = "", **fixed: Any) -> T:
    """`cls` built from the mapping `data`; `fixed` fields are set by the caller, not the file."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed]  # type: ignore[arg-type]
    values: dict[str, Any] = dict(fixed)
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key; allowed here: {', '.join(allowed)}")
        values[key] = _convert(value, hints[key], path)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The mapping `from_dict` reads back (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return plain(config)


def read_mapping(path: Path) -> dict[str, Any]:
    """A YAML (or JSON) file's top-level mapping; errors name the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys to values at the top")
    return data


def merged(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A file's mapping with dotted-key overrides ("language.engine.num_blocks": 77) set into it; the
    file's own mapping is left as it was."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[leaf] = value
    return out


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag that sets config keys: declared once, it both adds the argument
    (`add_flags`) and turns its parsed value into dotted overrides (`flag_overrides`). A flag not
    given leaves the file's value; one given wins over it."""

    name: str  # "--max-batch-tiles"
    key: str | tuple[str, ...]  # the dotted config key; or several, set alike unless `convert` returns one each
    help: str
    type: Callable[[str], Any] | None = None  # argparse's parsing of the text (None: the text)
    convert: Callable[[Any], Any] | None = None  # parsed value -> config value(s); None: as parsed
    switch: bool = False  # `--flag` alone means true
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    fallback: bool = False  # a shorthand: sets its keys only where no other flag given did

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    def values(self, value: Any) -> dict[str, Any]:
        """The dotted keys this flag sets for its parsed `value`."""
        converted = self.convert(value) if self.convert is not None else value
        if isinstance(self.key, str):
            return {self.key: converted}
        each = converted if self.convert is not None else (converted,) * len(self.key)
        return dict(zip(self.key, each, strict=True))


def add_flags(parser: Any, flags: Sequence[Flag]) -> None:
    """Add `flags` to an argparse parser or argument group; each defaults to None (not given)."""
    for flag in flags:
        options: dict[str, Any] = {"dest": flag.dest, "default": None, "help": flag.help}
        if flag.switch:
            options["action"] = "store_true"
        else:
            options.update(type=flag.type, metavar=flag.metavar)
        parser.add_argument(flag.name, *flag.aliases, **options)


def flag_overrides(args: Any, flags: Sequence[Flag]) -> dict[str, Any]:
    """Dotted config keys for the `flags` given on the command line (see `Flag`)."""
    out: dict[str, Any] = {}
    given = [f for f in flags if getattr(args, f.dest) is not None]
    for flag in sorted(given, key=lambda f: f.fallback):  # shorthands last: they only fill gaps
        for key, value in flag.values(getattr(args, flag.dest)).items():
            if flag.fallback:
                out.setdefault(key, value)
            else:
                out[key] = value
    return out


def config_or_flags(cls: type[T], args: Any, parser: Any, keep: tuple[str, ...] = ()) -> T:
    """A server's config: from `--config FILE` when given (then no other setting may be given as a
    flag, so nothing is silently overridden), else from its flags."""
    if not args.config:
        if getattr(args, "model", None) is None:
            raise ConfigError("--model is required (or --config FILE)")
        return cls.from_args(args)  # type: ignore[attr-defined]
    given = sorted(f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                   if k not in ("config", *keep) and v != parser.get_default(k))
    if given:
        raise ConfigError(f"--config {args.config} holds the whole configuration; also given as flags: "
                          f"{', '.join(given)}")
    return from_dict(cls, read_mapping(Path(args.config)), "")


def write_private(path: Path, config: Any) -> None:
    """Write a config for a child process, readable by this user only (it may hold the shared token)."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
