"""The preset checkpoint cache: a cached checkpoint is found without importing torch, so `dvd serve` and
`dvd gateway` without `--model` keep torch out of the gateway process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FIND_CACHED = """
import sys
from pathlib import Path
from dvd.tools.checkpoint_cache import ensure_checkpoint
path = ensure_checkpoint("tiny", cache_dir=Path(sys.argv[1]))
print(path)
print("torch" in sys.modules)
"""


def test_a_cached_checkpoint_is_found_without_importing_torch(tmp_path: Path) -> None:
    cached = tmp_path / "checkpoints" / "tiny-hf"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")  # what ensure_checkpoint looks for; nothing reads it here
    result = subprocess.run([sys.executable, "-c", FIND_CACHED, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, check=True)
    path, torch_imported = result.stdout.split()
    assert Path(path) == cached
    assert torch_imported == "False", "ensure_checkpoint imported torch for a checkpoint that was already built"
