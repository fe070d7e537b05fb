"""The trainer end to end, with real tiny networks: it learns, the GAN moves both networks,
resume is exact, SIGTERM leaves a loadable state, and only a better model is published."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from model.checkpoint import load_generator, read_info, save_checkpoint
from model.discriminator import Discriminator
from model.generator import Generator, GeneratorConfig
from model.store import current_checkpoint, publish
from tests.conftest import write_config
from tests.test_train_data import photo_folder
from core.config import TrainerConfig
from trainer.publish import publish_if_better
from trainer.train import EXIT_INTERRUPTED, EXIT_LOCKED, lr_factor, train
from trainer.validation import ValidationSet
from upscaled.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = {"generator_channels": 16, "generator_blocks": 2, "generator_batchnorm": False, "discriminator_width": 8}


def records(run: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def random_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(path, Generator(GeneratorConfig(scale=4, channels=16, blocks=2, batchnorm=False)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """300 L1 steps of a 16x2 generator on three small photos, validated on them, with --publish
    against a models folder whose current model is an untrained network."""
    root = tmp_path_factory.mktemp("trained")
    photos = photo_folder(root / "photos", 3)
    models = root / "models"
    publish(models, random_checkpoint(root / "untrained.safetensors", 0))
    tc = TrainerConfig(data=str(photos), val=str(photos), **TINY, batch=16, crop=48, steps=300, pretrain_steps=300,
                       lr_g=5e-3, lr_schedule="constant", ema=0.9, val_every=150, log_every=50, save_every=1000,
                       workers=0, seed=1, downscale_min=1.0, downscale_max=1.0)
    t0 = time.time()
    assert train(tc, root / "run", models_dir=models, publish=True) == 0
    return {"root": root, "run": root / "run", "photos": photos, "models": models, "seconds": time.time() - t0}


def test_a_tiny_generator_learns_to_beat_bicubic(trained):
    run = trained["run"]
    vals = records(run, "val")
    assert [v["step"] for v in vals] == [150, 300]
    last = vals[-1]
    assert last["psnr_y"] > last["bicubic_psnr_y"] + 0.3, last
    assert last["psnr_y"] > vals[0]["psnr_y"]
    info = read_info(run / "best.safetensors")
    assert info.metrics["psnr_y"] == pytest.approx(last["psnr_y"])
    assert info.validation["fingerprint"].startswith("sha256:") and info.validation["data"] == str(trained["photos"])
    assert {"psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y", "count"} <= set(info.metrics)
    assert (run / "samples" / "step_0000300.png").is_file() and (run / "last.safetensors").is_file()
    train_recs = records(run, "train")
    assert train_recs[-1]["l1"] < train_recs[0]["l1"]


def test_a_better_model_is_published_and_recorded(trained):
    (gate,) = records(trained["run"], "gate")
    assert gate["published"] and gate["current_origin"] == "published", gate
    assert gate["candidate_psnr_y"] > gate["current_psnr_y"]
    assert read_info(current_checkpoint(trained["models"])).version == read_info(trained["run"] / "best.safetensors").version


def test_a_worse_model_is_not_published(trained, tmp_path):
    models = trained["models"]
    before = current_checkpoint(models)
    val = ValidationSet.load(trained["photos"], 4)
    worse = random_checkpoint(tmp_path / "worse.safetensors", 1)
    r = publish_if_better(worse, val, models)
    assert not r.published and r.reason.startswith("not better"), r
    assert current_checkpoint(models) == before
    assert publish_if_better(trained["run"] / "best.safetensors", val, models).reason.startswith("already published")
    # a real improvement that does not clear the tolerance is not published either; with nothing
    # published, the bundled default is what the candidate is compared with
    empty = tmp_path / "models"
    r = publish_if_better(trained["run"] / "best.safetensors", val, empty, tolerance_db=100.0)
    assert not r.published and r.current_origin == "bundled" and "tolerance 100.0 dB" in r.reason, r
    assert current_checkpoint(empty) is None


def test_eval_prints_the_table(trained, capsys, monkeypatch):
    monkeypatch.chdir(trained["root"])  # built-in defaults, not the repository's config.yaml
    monkeypatch.delenv("UPSCALED_CONFIG", raising=False)
    rc = cli_main(["eval", "--data", str(trained["photos"]), "--model", str(trained["run"] / "best.safetensors")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model PSNR" in out and "bicubic PSNR" in out and "lanczos PSNR" in out
    lines = out.strip().splitlines()
    assert "photo0.png" in out and lines[-2].startswith("mean") and lines[-1].startswith("gain over bicubic (PSNR-Y): model ")
    rc = cli_main(["eval", "--data", str(trained["photos"]), "--model", str(trained["run"] / "best.safetensors"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(report["images"]) == 3 and report["mean_psnr_y"]["model"] > report["mean_psnr_y"]["bicubic"]
    assert report["fingerprint"] == read_info(trained["run"] / "best.safetensors").validation["fingerprint"]
    rc = cli_main(["eval", "--data", str(trained["photos"]), "--model", str(trained["run"] / "best.safetensors"), "--json", "--max-images", "1"])
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["images"]) == 1
    rc = cli_main(["eval", "--data", str(trained["photos"]), "--model", str(trained["run"] / "best.safetensors"), "--json", "--self-ensemble", "4"])
    four = json.loads(capsys.readouterr().out)
    assert rc == 0 and four["self_ensemble"] == 4 and report["self_ensemble"] == 1
    assert four["mean_psnr_y"]["model"] != report["mean_psnr_y"]["model"]  # the flag reached the engine


def _small(photos: Path, **kw) -> TrainerConfig:
    base = dict(data=str(photos), **TINY, batch=4, crop=32, steps=12, pretrain_steps=6, log_every=1, save_every=100,
                val_every=1000, workers=0, seed=3, downscale_min=0.5, downscale_max=1.0, degrade_noise=0.5, degrade_jpeg=0.5)
    base.update(kw)
    return TrainerConfig(**base)


def test_learning_rate_warms_up_and_each_phase_anneals_to_its_end():
    both = TrainerConfig(steps=3000, pretrain_steps=1000)
    assert lr_factor(0, both) < 0.05 and lr_factor(100, both) > 0.9
    assert lr_factor(999, both) < 0.02  # pre-training annealed ...
    assert lr_factor(1100, both) > 0.9 and lr_factor(2999, both) < 0.02  # ... and the GAN phase
    # A run shorter than pretrain_steps (L1 only, or shortened with --resume --steps) still anneals.
    short = TrainerConfig(steps=2000, pretrain_steps=5000)
    assert lr_factor(1999, short) < 0.02


def test_a_gan_step_moves_both_networks(tmp_path):
    photos = photo_folder(tmp_path / "photos", 2)
    tc = _small(photos, steps=1, pretrain_steps=0, generator_batchnorm=True)
    assert train(tc, tmp_path / "run") == 0
    torch.manual_seed(tc.seed)  # the trainer's initial weights, rebuilt
    g0 = Generator(GeneratorConfig(scale=4, channels=16, blocks=2, batchnorm=True, upsampler=tc.generator_upsampler,
                                   skip=tc.generator_skip)).state_dict()
    d0 = Discriminator(8).state_dict()
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["step"] == 1
    for name, net0, net1 in (("generator", g0, state["generator"]), ("discriminator", d0, state["discriminator"])):
        params = [k for k in net0 if not k.startswith(("running", "num_batches")) and "running_" not in k and "num_batches" not in k]
        unchanged = [k for k in params if torch.equal(net0[k], net1[k])]
        assert not unchanged, f"{name}: {unchanged}"
    (rec,) = records(tmp_path / "run", "train")
    assert rec["phase"] == "gan" and {"loss_d", "adv", "l1", "d_real", "d_fake"} <= set(rec)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    photos = photo_folder(tmp_path / "photos", 2)
    tc = _small(photos)
    assert train(tc, tmp_path / "straight") == 0
    assert train(tc, tmp_path / "resumed", until=4) == EXIT_INTERRUPTED  # stops in phase 1 ...
    assert train(tc, tmp_path / "resumed", resume=True, until=8) == EXIT_INTERRUPTED  # ... and in the GAN
    assert train(tc, tmp_path / "resumed", resume=True) == 0
    keys = ("l1", "loss_g", "loss_d", "adv", "d_real", "d_fake")
    straight = {r["step"]: {k: r.get(k) for k in keys} for r in records(tmp_path / "straight", "train")}
    resumed = {r["step"]: {k: r.get(k) for k in keys} for r in records(tmp_path / "resumed", "train")}
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        for k in keys:
            a, b = straight[step][k], resumed[step][k]
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-5, abs=1e-7), (step, k, a, b)
    s1 = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)
    s2 = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    for k in s1["ema"]:
        assert torch.allclose(s1["ema"][k].float(), s2["ema"][k].float(), rtol=1e-5, atol=1e-6), k


def test_sigterm_saves_a_loadable_state_and_the_run_resumes(tmp_path):
    photos = photo_folder(tmp_path / "photos", 2)
    cfg = {"trainer": {**TINY, "batch": 2, "crop": 32, "steps": 100000, "pretrain_steps": 3, "log_every": 1,
                       "save_every": 100000, "val_every": 100000, "workers": 1, "seed": 5}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    args = ["train", "--config", str(tmp_path / "config.yaml"), "--data", str(photos), "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "upscaled", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until it is training in the GAN phase
            metrics = run / "metrics.jsonl"
            if metrics.exists() and '"phase": "gan"' in metrics.read_text():
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        # A second run under the same config never overlaps the first (the periodic timer and a person).
        assert cli_main([*args[:-1], str(tmp_path / "run2")]) == EXIT_LOCKED
        assert not (tmp_path / "run2").exists()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "stopped by SIGTERM" in out
    # stderr is a pipe, not a terminal: log lines with the step, no progress bar redrawn in the log
    assert "step 3/100000: l1 " in out and "step/s]" not in out and "\r" not in out
    state = torch.load(run / "state.pt", weights_only=True)
    step = state["step"]
    assert step > 3
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert cli_main([*args, "--resume", "--steps", str(step + 2)]) == 0
    assert torch.load(run / "state.pt", weights_only=True)["step"] == step + 2
    _g, info = load_generator(run / "last.safetensors")
    assert info.step == step + 2


def test_command_line_paths_are_relative_to_the_shell_and_config_paths_to_the_config(tmp_path, monkeypatch):
    import argparse

    from trainer.train import settings
    from core.config import load

    (tmp_path / "etc").mkdir()
    cfg = load(write_config(tmp_path / "etc", {"trainer": {"val": "val", "init": "../models/a.safetensors"}}))
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(data="photos", out="runs/x", init=None, val=None, paired_lr=None, paired_hr=None, steps=None)
    tc = settings(cfg, args)
    assert tc.data == str(tmp_path / "photos") and tc.out == str(tmp_path / "runs" / "x")
    assert tc.val == str(tmp_path / "etc" / "val") and tc.init == str(tmp_path / "models" / "a.safetensors")
    args.init = "gan"
    assert settings(cfg, args).init.endswith("gan.safetensors")


def test_eval_names_skips_and_reports_an_unreadable_image(trained, capsys, tmp_path):
    import shutil as sh

    val = tmp_path / "val"
    sh.copytree(trained["photos"], val)
    (val / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rc = cli_main(["eval", "--data", str(val), "--model", str(trained["run"] / "best.safetensors"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and len(report["images"]) == len(list(trained["photos"].iterdir()))
    assert len(report["skipped"]) == 1 and "broken.png" in report["skipped"][0]


def test_train_refuses_to_overwrite_a_run_without_resume_or_restart(trained, tmp_path):
    run = trained["run"]
    before = (run / "best.safetensors").read_bytes()
    args = ["train", "--data", str(trained["photos"]), "--out", str(run), "--steps", "2"]
    assert cli_main(args) == 2
    assert (run / "best.safetensors").read_bytes() == before
