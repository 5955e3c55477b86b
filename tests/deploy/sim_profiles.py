"""Stage-cost profiles with round numbers, so a simulated request's times can be worked out by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvd.deploy.cost_profile import CostProfile, load_profile

# vision: 0.1 s a tile (0.11 with ViR); preprocessing 0.01 s a tile; prefill 2 ms a token; decode 5 ms + 5 ms
# a request in the batch; 1 us a byte on the wire; a tile is 4 tokens (2 with ViR) of 100 bytes.
HAND: list[dict[str, Any]] = [
    {"stage": "vision", "tiles": 1, "seconds": 0.1},
    {"stage": "vision", "tiles": 1, "vir": True, "seconds": 0.11},
    {"stage": "features", "tokens_per_tile": 4, "bytes_per_token": 100},
    {"stage": "features", "vir": True, "tokens_per_tile": 2, "bytes_per_token": 100},
    {"stage": "preprocess", "tiles": 1, "seconds": 0.01},
    {"stage": "prefill", "tokens": 100, "seconds": 0.2},
    {"stage": "decode", "batch": 1, "context": 100, "seconds": 0.01},
    {"stage": "decode", "batch": 2, "context": 100, "seconds": 0.015},
    {"stage": "transport", "bytes": 1000, "seconds": 0.001},
]


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def hand_profile(tmp_path: Path, drop: tuple[str, ...] = (), **replace: dict[str, Any]) -> CostProfile:
    """HAND without the stages in `drop`, and with `replace[stage]` standing for that stage's lines."""
    records = [r for r in HAND if r["stage"] not in drop and r["stage"] not in replace]
    records += [{"stage": stage, **fields} for stage, fields in replace.items()]
    return load_profile(write(tmp_path / "profile.jsonl", records))
