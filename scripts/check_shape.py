"""Check DvD's shape as it installs: the import layers (import-linter) and the types (mypy).

Everything installs under `dvd.` while the folders keep the product's layout (pyproject's
`[tool.setuptools.package-dir]` maps `transport/` to `dvd.transport`, and so on). Both tools find
modules by walking folders, so from the source tree they would see `dvd/` alone and check nothing
of the rest: a contract that passes while checking nothing is worse than none. This script lays the
package out as a wheel would (links to the source files, in a temporary folder), runs the tools
there, and prints their findings with the source paths.

    python scripts/check_shape.py            # layers and types (what scripts/test.sh runs)
    python scripts/check_shape.py layers     # only the import contracts
    python scripts/check_shape.py --tree DIR layers   # check an already laid-out tree (tests plant violations in one)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Import name -> source folder, from pyproject's package-dir table."""
    table = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: root / folder for name, folder in table.items()}


def lay_out(dest: Path, root: Path = ROOT, link: bool = True) -> dict[Path, Path]:
    """Lay the package out under `dest` as it installs; returns laid-out file -> source file.
    `link`: symbolic links (the tools report paths we map back); else copies (to plant changes in)."""
    placed: dict[Path, Path] = {}
    for name, folder in package_dirs(root).items():
        target = dest.joinpath(*name.split("."))
        for source in (*folder.rglob("*.py"), *folder.rglob("*.pyi")):
            relative = source.relative_to(folder)
            if "__pycache__" in relative.parts or _belongs_to_other(name, folder, source, root):
                continue
            out = target / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            if link:
                out.symlink_to(source)
            else:
                out.write_bytes(source.read_bytes())
            placed[out] = source
    return placed


def _belongs_to_other(name: str, folder: Path, source: Path, root: Path) -> bool:
    """A file under `folder` that another package-dir entry maps (nested folders) is laid out there."""
    for other, other_folder in package_dirs(root).items():
        if other != name and other_folder != folder and other_folder.is_relative_to(folder) \
                and source.is_relative_to(other_folder):
            return True
    return False


def run_layers(tree: Path) -> int:
    """import-linter's contracts (pyproject's [tool.importlinter]) over the laid-out tree."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    lint = Path(sys.executable).with_name("lint-imports")
    # Run from the tree: import-linter puts the working folder first on sys.path, and the source
    # tree's dvd/ (without the mapped folders) must not shadow the laid-out one.
    return subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tree,
                          env=env).returncode


def run_types(tree: Path, placed: dict[Path, Path]) -> int:
    """mypy (pyproject's [tool.mypy]) over the laid-out package, findings printed with source paths."""
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                             "--cache-dir", str(ROOT / ".mypy_cache"), "-p", "dvd"],
                            cwd=tree, capture_output=True, text=True, env={**os.environ, "MYPYPATH": str(tree)})
    text = result.stdout + result.stderr
    for out, source in sorted(placed.items(), key=lambda kv: -len(str(kv[0]))):
        text = text.replace(str(out.relative_to(tree)), str(source.relative_to(ROOT)))
    print(text, end="")
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checks", nargs="*", choices=["layers", "types"], default=["layers", "types"])
    parser.add_argument("--tree", type=Path, help="an already laid-out tree to check (layers only)")
    args = parser.parse_args(argv)
    if args.tree is not None:
        return run_layers(args.tree)
    with tempfile.TemporaryDirectory(prefix="dvd-shape-") as tmp:
        tree = Path(tmp)
        placed = lay_out(tree)
        code = 0
        if "layers" in args.checks:
            code |= run_layers(tree)
        if "types" in args.checks:
            code |= run_types(tree, placed)
        return code


if __name__ == "__main__":
    sys.exit(main())
