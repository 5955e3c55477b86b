"""Preset checkpoints built once with `make_checkpoint` and kept in a cache directory (benchmarks,
and `dvd serve` without --model)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$DVD_CACHE_DIR`, else `~/.cache/dvd` (read when called, never at import)."""
    return Path(os.environ.get("DVD_CACHE_DIR") or Path.home() / ".cache" / "dvd")


def ensure_checkpoint(preset: str = "internvl3_5-1b-shaped", fmt: str = "hf", flash: bool = False,
                      cache_dir: Path | None = None) -> Path:
    """The cached random-weight checkpoint for `preset`, built on first use (about a minute for 1B).

    Built in a private directory and renamed into place, so concurrent callers never see half a
    checkpoint; the first rename wins. torch is imported only to build one: a gateway started without
    `--model` finds the checkpoint cached and stays torch-free.
    """
    name = f"{preset}-{fmt}{'-flash' if flash else ''}"
    path = (cache_dir or default_cache_dir()) / "checkpoints" / name
    if (path / "config.json").exists():
        return path
    from dvd.tools.make_checkpoint import make_checkpoint

    log.warning("building the %s checkpoint in %s (once; its weights are random)", name, path)
    scratch = path.with_name(f".{name}.{os.getpid()}")
    make_checkpoint(scratch, preset=preset, fmt=fmt, flash=flash, seed=0)
    try:
        scratch.rename(path)
    except OSError:  # another process finished first
        shutil.rmtree(scratch, ignore_errors=True)
    return path
