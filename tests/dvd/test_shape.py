"""The package's shape: one import namespace (`dvd`) as it installs, and import layers that really see
the folders mapped into it (a contract that passes while checking nothing is worse than none)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_shape.py"


def _check_shape() -> object:
    spec = importlib.util.spec_from_file_location("check_shape", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--tree", str(tree), "layers"], capture_output=True,
                          text=True, timeout=120)


def test_layers_are_kept() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "layers"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def test_planted_violations_break_the_contract(tmp_path: Path) -> None:
    """Each layer boundary, crossed once in a copy of the laid-out package, is reported by name."""
    _check_shape().lay_out(tmp_path, link=False)  # type: ignore[attr-defined]
    planted = {
        "dvd/errors.py": "import dvd.pipeline.serving",  # the core imports the gateway
        "dvd/transport/wire.py": "import dvd.vision_server.engine",  # the transport imports a server
        "dvd/vision_server/cache.py": "import dvd.language_server.feature_pool",  # one server imports the other
        "dvd/pipeline/metrics.py": "import dvd.deploy",  # the gateway imports deployment
    }
    for path, line in planted.items():
        with (tmp_path / path).open("a") as f:
            f.write(f"\n{line}  # planted\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    # import-linter names a crossing between layers that are packages by package, then the import itself
    for importer, imported in [("dvd.errors", "dvd.pipeline.serving"),
                               ("dvd.transport.wire", "dvd.vision_server.engine"),
                               ("dvd.vision_server.cache", "dvd.language_server.feature_pool"),
                               ("dvd.pipeline.metrics", "dvd.deploy")]:
        assert f"- {importer} -> {imported} (l." in result.stdout, result.stdout


def test_a_new_core_module_must_be_placed(tmp_path: Path) -> None:
    """exhaustive: a module the layers do not name fails the check, so none escapes it."""
    _check_shape().lay_out(tmp_path, link=False)  # type: ignore[attr-defined]
    (tmp_path / "dvd" / "unplaced.py").write_text("X = 1\n")
    result = _lint(tmp_path)
    assert result.returncode != 0 and "dvd.unplaced" in result.stdout, result.stdout


@pytest.mark.slow
def test_the_distribution_installs_dvd_alone(tmp_path: Path) -> None:
    """A wheel built from the sources puts one top-level name into site-packages: `dvd`."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", "tests", "*.png", "*.json")
    shutil.copytree(ROOT, source, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = {n.split("/")[0] for n in archive.namelist() if ".dist-info/" not in n}
    assert names == {"dvd"}
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
    for module in ("dvd/transport/wire.py", "dvd/vision_server/engine.py", "dvd/language_server/engine.py",
                   "dvd/pipeline/serving.py", "dvd/deploy/__init__.py", "dvd/benchmarks/cli.py",
                   "dvd/v1/vision_pb2.py"):
        assert module in files


def test_a_server_importing_the_checkpoint_tools_breaks_the_contract(tmp_path: Path) -> None:
    """dvd.tools sits above the core for the commands and benchmarks; the servers and the transport never
    import it."""
    _check_shape().lay_out(tmp_path, link=False)  # type: ignore[attr-defined]
    with (tmp_path / "dvd/language_server/feature_pool.py").open("a") as f:
        f.write("\nimport dvd.tools.make_checkpoint  # planted\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "dvd.language_server.feature_pool -> dvd.tools.make_checkpoint (l." in result.stdout, result.stdout
