"""The read-only and pointer-only commands never import torch (it costs seconds on every call).

`upscaled models list`, `models show` and `models rollback` read safetensors headers and move the
signed `current` pointer; `upscaled status` reads a JSON file. None of that needs tensors, so the
real entry point runs under `python -X importtime` and every module it imported is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

from model import store
from model.checkpoint import save_checkpoint
from tests.conftest import run_cli, tiny_generator, write_config

HEAVY = ("torch", "safetensors.torch", "model.generator", "model.foreign", "spandrel")


def imported(stderr: str) -> set[str]:
    """The modules `-X importtime` reported importing ("import time: self | cumulative | name")."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def run_light(*args: str) -> tuple[object, set[str]]:
    r = run_cli(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    mods = imported(r.stderr)
    assert "upscaled.cli" in mods, "-X importtime reported nothing: the check would pass vacuously"
    return r, mods


def assert_light(mods: set[str], what: str) -> None:
    heavy = sorted(m for m in mods if m.split(".")[0] in {"torch", "spandrel"} or m in HEAVY)
    assert not heavy, f"`upscaled {what}` imported {heavy[:8]}"


def test_models_list_show_rollback_and_status_never_import_torch(tmp_path: Path) -> None:
    models = tmp_path / "models"
    names = []
    for seed in (1, 2):  # two promoted checkpoints, so a rollback has somewhere to go
        ck = tmp_path / f"c{seed}.safetensors"
        save_checkpoint(ck, tiny_generator(seed=seed), step=seed)
        names.append(store.publish(models, ck).name)
    cfg = write_config(tmp_path, {"paths": {"models": str(models), "status": str(tmp_path / "status.json")}})

    r, mods = run_light("models", "list", "--json", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    listed = json.loads(r.stdout)
    assert listed["current"] == names[1] and len(listed["versions"]) >= 5  # three bundled, two published
    assert_light(mods, "models list --json")

    r, mods = run_light("models", "list", "--config", str(cfg))
    assert r.returncode == 0 and "PSNR-Y" in r.stdout, r.stderr[-2000:]
    assert_light(mods, "models list")

    r, mods = run_light("models", "show", "fidelity", "--config", str(cfg))
    assert r.returncode == 0 and json.loads(r.stdout)["bundled"] == "fidelity", r.stderr[-2000:]
    assert_light(mods, "models show fidelity")

    r, mods = run_light("models", "show", Path(names[0]).stem, "--config", str(cfg))
    assert r.returncode == 0 and json.loads(r.stdout)["file"].endswith(names[0]), r.stderr[-2000:]
    assert_light(mods, "models show VERSION")

    # One step back: the signed records are checked and `current` rewritten, all without tensors.
    r, mods = run_light("models", "rollback", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    assert store.verified_current(models)[0].name == names[0]
    assert_light(mods, "models rollback")

    r, mods = run_light("models", "rollback", Path(names[1]).stem, "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    assert store.verified_current(models)[0].name == names[1]
    assert_light(mods, "models rollback VERSION")

    r, mods = run_light("models", "rollback", "bundled", "--config", str(cfg))
    assert r.returncode == 0 and store.current_checkpoint(models) is None, r.stderr[-2000:]
    assert_light(mods, "models rollback bundled")

    r, mods = run_light("status", "--config", str(cfg))
    assert r.returncode == 3, r.stderr[-2000:]  # no daemon running
    assert_light(mods, "status")
