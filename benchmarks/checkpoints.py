"""Benchmark checkpoints: built once with `dvd make-checkpoint` and kept in a cache directory."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$DVD_CACHE_DIR`, else `~/.cache/dvd` (read when called, never at import)."""
    return Path(os.environ.get("DVD_CACHE_DIR") or Path.home() / ".cache" / "dvd")


def ensure_checkpoint(preset: str = "internvl3_5-1b-shaped", fmt: str = "hf", flash: bool = False,
                      cache_dir: Path | None = None) -> Path:
    """The cached random-weight checkpoint for `preset`, built on first use (about a minute for 1B)."""
    from dvd.make_checkpoint import make_checkpoint

    name = f"{preset}-{fmt}{'-flash' if flash else ''}"
    path = (cache_dir or default_cache_dir()) / "checkpoints" / name
    if not (path / "config.json").exists() or not (path / "generation_config.json").exists():
        print(f"building {name} checkpoint in {path} (once)...", flush=True)
        make_checkpoint(path, preset=preset, fmt=fmt, flash=flash, seed=0)
    return path
