"""The layers (pyproject.toml [tool.importlinter], docs/architecture.md): imports only point down,
daemon/ and trainer/ never import each other, and the architecture page is drawn from the code
as it is. Real `lint-imports` and bench/architecture.py runs, on this tree and on a copy with a
wrong import added, so a contract that checks nothing would fail here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "imaging", "model", "daemon", "trainer", "web", "upscaled")
LINT = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(cwd)  # the packages of `cwd`, not of the tree the tests run from
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def copy_tree(dst: Path) -> Path:
    """The Python packages, pyproject.toml, the page and its generator; no weights or data."""
    for p in PACKAGES:
        shutil.copytree(ROOT / p, dst / p, ignore=shutil.ignore_patterns("__pycache__", "bundled", "templates", "static"))
    for f in ("pyproject.toml", "docs/architecture.md", "bench/architecture.py"):
        (dst / f).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / f, dst / f)
    return dst


def test_lint_imports_keeps_the_contracts():
    r = run(LINT, ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


def test_an_upward_import_and_daemon_importing_trainer_are_refused(tmp_path):
    tree = copy_tree(tmp_path)
    assert run(LINT, tree).returncode == 0  # the copy on its own is clean
    with open(tree / "core" / "errors.py", "a") as f:
        f.write("\nimport upscaled.models_cmd  # noqa: E402,F401\n")
    with open(tree / "daemon" / "notify.py", "a") as f:
        f.write("\nfrom trainer import data  # noqa: E402,F401\n")
    r = run(LINT, tree)
    assert r.returncode == 1, r.stdout
    assert "core.errors -> upscaled.models_cmd" in r.stdout
    assert "daemon.notify -> trainer.data" in r.stdout
    assert "0 kept, 2 broken" in r.stdout


def test_architecture_page_matches_the_code(tmp_path):
    r = run([sys.executable, "bench/architecture.py", "--check"], ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    # A module the page does not show yet makes it stale.
    tree = copy_tree(tmp_path)
    assert run([sys.executable, "bench/architecture.py", "--check"], tree).returncode == 0
    (tree / "model" / "extra.py").write_text("from core.config import Config  # noqa: F401\n")
    r = run([sys.executable, "bench/architecture.py", "--check"], tree)
    assert r.returncode == 1 and "out of date: docs/architecture.md" in r.stdout
