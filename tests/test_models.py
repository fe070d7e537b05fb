"""The models folder, model verification, and `upscaled models` through real subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import store
from model.checkpoint import CheckpointError, save_checkpoint
from model.generator import Generator, GeneratorConfig
from model.verify import verify_checkpoint
from tests.conftest import TINY, natural_image, run_cli, save_image, tiny_generator, write_config

CLAIMS = {"data": "val", "metrics": {"psnr_y": 30.0, "bicubic_psnr_y": 28.0}}


def run_clis(*commands: list[str]) -> list:
    """Several `upscaled` commands side by side, each a real subprocess (as run_cli runs it; each
    one's start is mostly a single-threaded `import torch`): only commands whose order does not
    matter. Their results in the order given."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda cmd: run_cli(*cmd), commands))


def gray_model() -> Generator:
    """Outputs flat mid-gray: poor, but far better than scrambled weights."""
    g = Generator(TINY)
    with torch.no_grad():
        for p in g.parameters():
            p.zero_()
    return g.eval()


def scrambled_model(seed: int = 0) -> Generator:
    g = tiny_generator(seed=seed)
    with torch.no_grad():
        g.tail.weight.mul_(200.0)
    return g


def test_publish_points_current_keeps_history_and_prunes(tmp_path: Path) -> None:
    models = tmp_path / "models"
    names = []
    for i in range(4):
        ck = tmp_path / f"c{i}.safetensors"
        save_checkpoint(ck, tiny_generator(seed=i), step=i)
        names.append(store.publish(models, ck, keep=2).name)
        assert store.current_checkpoint(models).name == names[-1]
    assert sorted(p.name for p, _ in store.published(models)) == sorted(names[-2:])
    assert store.history(models)[-2:] == names[-2:]
    # Rolling back keeps the rolled-back-from version: retention never deletes the current one.
    store.set_current(models, names[-2])
    assert store.current_checkpoint(models).name == names[-2]


def test_publish_refuses_bad_file_and_changes_nothing(tmp_path: Path, tiny_ckpt: Path) -> None:
    models = tmp_path / "models"
    good = store.publish(models, tiny_ckpt)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(tiny_ckpt.read_bytes()[:300])
    with pytest.raises(CheckpointError):
        store.publish(models, bad)
    assert store.current_checkpoint(models) == good and len(store.published(models)) == 1


def test_verify_accepts_a_sound_model(tiny_ckpt: Path) -> None:
    g, info, probe = verify_checkpoint(tiny_ckpt, 4)
    assert info.scale == 4 and probe is not None and np.isfinite(probe.psnr_y)


def test_verify_refuses_wrong_scale(tmp_path: Path) -> None:
    p = tmp_path / "x2.safetensors"
    save_checkpoint(p, tiny_generator(GeneratorConfig(scale=2, channels=8, blocks=1)))
    with pytest.raises(CheckpointError, match="x2 model.*x4"):
        verify_checkpoint(p, 4)


def test_verify_refuses_scrambled_model_claiming_metrics(tmp_path: Path) -> None:
    p = tmp_path / "scrambled.safetensors"
    save_checkpoint(p, scrambled_model(), validation=CLAIMS)
    with pytest.raises(CheckpointError, match="below bicubic"):
        verify_checkpoint(p, 4)


def test_models_cli_promote_list_show_rollback(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"paths": {"models": "models"}})
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    # (an untrained model may not claim to beat bicubic: verification would refuse it)
    ia = save_checkpoint(a, tiny_generator(seed=1), step=10, validation={"metrics": {"psnr_y": 30.0, "ssim_y": 0.9}})
    ib = save_checkpoint(b, tiny_generator(seed=2), step=20)
    nan = tmp_path / "nan.safetensors"
    g = tiny_generator(seed=3)
    with torch.no_grad():
        g.head[0].weight.fill_(float("nan"))
    save_checkpoint(nan, g)

    # random weights: far below bicubic, so only with --force (refusal: the next test); the NaN
    # model, refused before anything is published, side by side with the first promotion
    promoted_a, r = run_clis(["models", "promote", str(a), "--force", "--config", str(cfg)],
                             ["models", "promote", str(nan), "--force", "--config", str(cfg)])
    assert promoted_a.returncode == 0
    assert r.returncode == 2 and "NaN" in r.stderr
    assert run_cli("models", "promote", str(b), "--force", "--config", str(cfg)).returncode == 0

    # three readers of the models folder, side by side
    as_json, as_text, as_shown = run_clis(["models", "list", "--json", "--config", str(cfg)],
                                          ["models", "list", "--config", str(cfg)],
                                          ["models", "show", ia.version, "--config", str(cfg)])
    listing = json.loads(as_json.stdout)
    published = [v for v in listing["versions"] if not v["bundled"]]
    assert [v["version"] for v in published] == [ia.version, ib.version]
    assert [v["current"] for v in listing["versions"]] == [False] * (len(listing["versions"]) - 1) + [True]
    text = as_text.stdout
    assert f"*  {ib.version}" in text and "PSNR-Y 30.00 dB, SSIM 0.9000" in text  # current; no daemon serves it

    shown = json.loads(as_shown.stdout)
    assert shown["step"] == 10 and shown["validation"]["metrics"]["psnr_y"] == 30.0

    assert run_cli("models", "rollback", "--config", str(cfg)).returncode == 0
    assert store.current_checkpoint(tmp_path / "models").name == f"{ia.version}.safetensors"
    assert run_cli("models", "rollback", ib.version, "--config", str(cfg)).returncode == 0
    assert store.current_checkpoint(tmp_path / "models").name == f"{ib.version}.safetensors"


def test_rollback_walks_back_through_history_to_the_bundled_default(tmp_path: Path) -> None:
    from core.config import load as load_config
    from model.promote import cmd_promote

    cfg = write_config(tmp_path, {"paths": {"models": "models"}})
    versions = [save_checkpoint(tmp_path / f"{i}.safetensors", tiny_generator(seed=10 + i)).version for i in range(3)]
    for i in range(3):  # the history, by what `models promote --force` runs, in-process (its CLI: the test above)
        assert cmd_promote(load_config(cfg), tmp_path / f"{i}.safetensors", None, force=True) == 0
    served = []
    for _ in range(3):  # 2 -> 1 -> 0 -> bundled: no ping-pong between the last two
        assert run_cli("models", "rollback", "--config", str(cfg)).returncode == 0
        cur = store.current_checkpoint(tmp_path / "models")
        served.append(cur.stem if cur else "bundled")
    assert served == [versions[1], versions[0], "bundled"]
    # the listing and a rollback with nothing left to roll back to (it changes nothing), side by side
    as_json, r = run_clis(["models", "list", "--json", "--config", str(cfg)], ["models", "rollback", "--config", str(cfg)])
    listing = json.loads(as_json.stdout)
    assert [v["bundled"] for v in listing["versions"] if v["current"]] == ["fidelity"]  # the bundled default is marked
    assert r.returncode == 2 and "bundled default already serves" in r.stderr
    assert store.current_checkpoint(tmp_path / "models") is None
    # the bundled names work in rollback, promote and show
    assert run_cli("models", "rollback", "gan", "--config", str(cfg)).returncode == 0
    from model.checkpoint import BUNDLED, read_info
    assert store.current_checkpoint(tmp_path / "models").stem == read_info(BUNDLED["gan"]).version
    promoted, shown = run_clis(["models", "promote", "fidelity", "--config", str(cfg)],
                               ["models", "show", "gan", "--config", str(cfg)])  # a reader, side by side
    assert promoted.returncode == 0
    assert json.loads(shown.stdout)["bundled"] == "gan"
    assert run_cli("models", "rollback", "bundled", "--config", str(cfg)).returncode == 0
    assert store.current_checkpoint(tmp_path / "models") is None


def test_promote_refuses_a_model_below_bicubic_unless_forced(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"paths": {"models": "models"}})
    bad = tmp_path / "ten-steps.safetensors"
    save_checkpoint(bad, tiny_generator(seed=3), step=10)
    r = run_cli("models", "promote", str(bad), "--config", str(cfg))
    assert r.returncode == 1 and "below bicubic" in r.stderr and "--force" in r.stderr, r.stderr
    assert store.current_checkpoint(tmp_path / "models") is None  # the bundled model keeps serving
    r = run_cli("models", "promote", str(bad), "--force", "--config", str(cfg))
    assert r.returncode == 0 and "promoted despite" in r.stderr


def test_models_cli_gate_promotes_only_a_better_model(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"paths": {"models": "models"}, "inference": {"device": "cpu"}})
    val = tmp_path / "val"
    for i in range(2):
        save_image(val / f"v{i}.png", natural_image(48, 48, seed=i))
    worse, better = tmp_path / "worse.safetensors", tmp_path / "better.safetensors"
    save_checkpoint(worse, scrambled_model())
    ib = save_checkpoint(better, gray_model())
    assert run_cli("models", "promote", str(worse), "--force", "--config", str(cfg)).returncode == 0
    r = run_cli("models", "promote", str(better), "--force", "--gate", str(val), "--config", str(cfg))
    assert r.returncode == 0 and "gate passed" in r.stderr
    assert store.current_checkpoint(tmp_path / "models").name == f"{ib.version}.safetensors"
    r = run_cli("models", "promote", str(worse), "--gate", str(val), "--config", str(cfg))
    assert r.returncode == 1 and "not promoted" in r.stderr
    assert store.current_checkpoint(tmp_path / "models").name == f"{ib.version}.safetensors"


def test_listing_signs_the_gain_over_bicubic_either_way(tmp_path: Path) -> None:
    from upscaled.models_cmd import _metrics_text

    worse = save_checkpoint(tmp_path / "w.safetensors", tiny_generator(seed=4),
                            validation={"metrics": {"psnr_y": 12.0, "bicubic_psnr_y": 32.64}})
    better = save_checkpoint(tmp_path / "b.safetensors", tiny_generator(seed=5),
                             validation={"metrics": {"psnr_y": 34.0, "bicubic_psnr_y": 32.0}})
    assert "(20.64 dB below bicubic)" in _metrics_text(worse) and "\u2212" not in _metrics_text(worse)
    assert "(+2.00 dB over bicubic)" in _metrics_text(better)


def test_config_is_accepted_before_the_command_too(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"paths": {"status": "elsewhere/status.json"}})
    before = run_cli("--config", str(cfg), "status")
    after = run_cli("status", "--config", str(cfg))
    assert before.returncode == after.returncode == 3
    assert str(tmp_path / "elsewhere" / "status.json") in before.stdout and before.stdout == after.stdout
