"""The CUDA path: batched tiles with overlapped copies, self-ensemble, the out-of-memory retry,
the daemon serving from a GPU, and training on one (fp16's quality guard is test_speed_paths').
Skipped without a GPU; on one, `bench/gpu_check.sh` runs these with the benchmark in one call."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from loguru import logger
from PIL import Image

from imaging.images import Decoded
from model.engine import EngineOptions, Upscaler, plan_tiles
from model.generator import GeneratorConfig
from tests.conftest import natural_image, tiny_generator
from tests.daemon_helpers import files_under, make_config, serve, stop, tiny_checkpoint, wait_for, write_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs these on one)")


def levels(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """Largest and mean absolute difference, in output levels."""
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return int(d.max()), float(d.mean())


def test_batched_tiles_with_overlapped_copies_assemble_the_image_of_one_pass() -> None:
    # Each batch's result is copied to pinned memory while the next computes; a batch finished
    # out of order or read before its copy ended would show as wrong tiles.
    g = tiny_generator(GeneratorConfig(channels=16, blocks=2))
    img = natural_image(300, 420, seed=3)
    whole = Upscaler(g, None, EngineOptions(device="cuda", precision="fp16", tile=512)).upscale_rgb(img)
    tiled = Upscaler(g, None, EngineOptions(device="cuda", precision="fp16", tile=64, batch=4))
    out = tiled.upscale_rgb(img)
    n_tiles = len(plan_tiles(300, 420, 64, tiled.overlap)[1])
    assert n_tiles > 8 and tiled.forward_passes == math.ceil(n_tiles / 4)
    assert out.shape == whole.shape == (1200, 1680, 3)
    worst, mean = levels(out, whole)
    assert worst <= 2 and mean < 0.05, (worst, mean)
    cpu = Upscaler(g, None, EngineOptions(device="cpu", precision="fp32")).upscale_rgb(img)
    worst, mean = levels(out, cpu)
    assert worst <= 3 and mean < 0.3, (worst, mean)  # fp16 on the GPU against fp32 on the CPU


def test_self_ensemble_on_the_gpu_matches_the_cpu() -> None:
    g = tiny_generator(GeneratorConfig(channels=16, blocks=2))
    img = natural_image(120, 88, seed=4)
    gpu = Upscaler(g, None, EngineOptions(device="cuda", precision="fp16", self_ensemble=8, tile=48)).upscale_rgb(img)
    cpu = Upscaler(g, None, EngineOptions(device="cpu", precision="fp32", self_ensemble=8)).upscale_rgb(img)
    worst, mean = levels(gpu, cpu)
    assert worst <= 3 and mean < 0.3, (worst, mean)


def test_out_of_memory_retries_the_image_with_smaller_tiles() -> None:
    g = tiny_generator(GeneratorConfig(channels=64, blocks=2))
    up = Upscaler(g, None, EngineOptions(device="cuda", precision="fp16", tile=1024, batch=8))
    img = natural_image(640, 640, seed=5)
    ref = up.upscale_rgb(img)  # unconstrained: one 640 x 640 tile, a few GB at its widest
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + (512 << 20)) / total)
    try:
        passes = up.forward_passes
        out = up.upscale_rgb(img)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        logger.remove(sink)
    retries = [w for w in warnings if "out of memory" in w]
    assert len(retries) >= 4, warnings  # batch 8 -> 4 -> 2 -> 1, then a smaller tile at least once
    assert up.forward_passes - passes > 4  # the image was finished in several tiles
    worst, mean = levels(out, ref)
    assert worst <= 2 and mean < 0.05, (worst, mean)


def test_equal_size_images_share_one_forward_pass_on_the_gpu() -> None:
    up = Upscaler(tiny_generator(), None, EngineOptions(device="cuda"))
    assert up.dtype == torch.float16 and next(up.model.parameters()).is_cuda  # precision auto on a GPU
    decs = [Decoded(natural_image(96, 128, seed=i), None, 8, False, "PNG") for i in range(5)]
    assert up.batch_limit(decs[0].size) >= 5
    passes = up.forward_passes
    together = up.upscale_decoded_many(decs)
    assert up.forward_passes - passes == 1
    for d, enc in zip(decs, together):
        worst, _ = levels(enc.pixels, up.upscale_decoded(d).pixels)
        assert enc.pixels.shape == (384, 512, 3) and worst <= 1


def test_daemon_serves_from_the_gpu_with_an_io_thread_per_spare_core(tmp_path: Path) -> None:
    from daemon.worker import io_thread_count

    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    cfg, config = make_config(tmp_path, ckpt, inference={"device": "auto", "threads": 0}, daemon={"io_workers": "auto"})
    log = tmp_path / "daemon.log"
    proc = serve(config, log=log)
    try:
        for i in range(6):
            write_image(tmp_path / "stage" / f"p{i}.png", 96, 64, seed=i).rename(Path(cfg.path("inbox")) / f"p{i}.png")
        wait_for(lambda: len(files_under(Path(cfg.path("outbox")))) == 6, timeout=120, what="6 outputs")
        status = json.loads(Path(cfg.path("status")).read_text())
        assert status["device"].startswith("cuda"), status
    finally:
        assert stop(proc) == 0
    text = log.read_text()
    assert f"{io_thread_count('auto', 'cuda')} I/O threads" in text, text[-2000:]
    for i in range(6):
        with Image.open(Path(cfg.path("outbox")) / f"p{i}.png") as im:
            assert im.size == (384, 256)


def test_training_on_the_gpu_runs_both_phases_validates_and_resumes(tmp_path: Path) -> None:
    from model.checkpoint import load_generator as load
    from tests.test_train import TINY, records
    from tests.test_train_data import photo_folder
    from trainer.train import EXIT_INTERRUPTED, train
    from core.config import TrainerConfig

    photos = photo_folder(tmp_path / "photos", 2)
    tc = TrainerConfig(data=str(photos), val=str(photos), **TINY, batch=4, crop=32, steps=12, pretrain_steps=6,
                       log_every=1, save_every=100, val_every=6, workers=0, seed=3, device="cuda")
    run = tmp_path / "run"
    assert train(tc, run, until=8) == EXIT_INTERRUPTED  # stopped in the GAN phase ...
    assert train(tc, run, resume=True) == 0  # ... and finished from its saved state
    steps = records(run, "train")
    assert sorted(r["step"] for r in steps) == list(range(1, 13))
    assert {r["phase"] for r in steps} == {"pretrain", "gan"}
    assert all(math.isfinite(r[k]) for r in steps for k in ("l1", "loss_g") if k in r)
    vals = records(run, "val")
    assert vals and all(math.isfinite(v["psnr_y"]) for v in vals), vals
    g, info = load(run / "best.safetensors")
    out = Upscaler(g, info, EngineOptions(device="cuda")).upscale_rgb(natural_image(24, 32))
    assert out.shape == (96, 128, 3)


def test_imported_model_runs_tiled_in_fp16_on_the_gpu_like_fp32_on_the_cpu() -> None:
    # An imported ESRGAN (spandrel) through the same batched CUDA path: fp16 by autocast where
    # spandrel says it may, tiles with context and feathered seams.
    pytest.importorskip("spandrel")
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet

    from model.foreign import ForeignNet, ForeignSpec, detect

    torch.manual_seed(0)
    desc = detect({k: v for k, v in RRDBNet(num_filters=16, num_blocks=1, scale=4).state_dict().items()})
    img = natural_image(160, 200, seed=5)
    gpu_up = Upscaler(ForeignNet(desc, ForeignSpec.of(desc)), None, EngineOptions(device="cuda", precision="fp16", tile=64, batch=4))
    assert gpu_up.dtype == torch.float16
    gpu = gpu_up.upscale_rgb(img)
    cpu = Upscaler(ForeignNet(desc, ForeignSpec.of(desc)), None, EngineOptions(device="cpu", precision="fp32", tile=4096)).upscale_rgb(img)
    worst, mean = levels(gpu, cpu)
    assert gpu.shape == (640, 800, 3) and mean < 0.6, (worst, mean)
