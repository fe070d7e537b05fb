"""Inference runtimes (model/runtimes.py): every exported runtime gives PyTorch fp32's output on
tiny real generators, through everything the engine does around it (tiles, batches, 16-bit,
alpha, self-ensemble), and the selection: forced, probed, cached per model version and CPU, and
PyTorch for what an exported graph cannot take."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import CheckpointInfo, load_model, save_checkpoint
from model.engine import EngineOptions, Upscaler, cpu_has_native_bf16
from model.generator import GeneratorConfig
from imaging.images import Encoded, decode, encode
from model.runtimes import EXPORTED, PRECISIONS, ProbeCache, cache_key, cpu_identity, label

VARIANTS = [(r, p) for r in EXPORTED for p in PRECISIONS[r]]  # every exported runtime in every precision it runs
from tests.conftest import natural_image, tiny_generator

CONFIGS = [
    GeneratorConfig(scale=4, channels=8, blocks=1),  # stages (two shuffles, 9x9 tail moved before the last), BN
    GeneratorConfig(scale=4, channels=8, blocks=2, batchnorm=False, upsampler="lowres", skip="bilinear"),  # the bundled layout
    GeneratorConfig(scale=2, channels=8, blocks=1, skip="bicubic"),
]


def engine(g, runtime: str, info: CheckpointInfo | None = None, **kw) -> Upscaler:
    return Upscaler(g, info, EngineOptions(device="cpu", precision=kw.pop("precision", "fp32"), runtime=runtime, **kw))


@pytest.mark.parametrize("runtime,precision", VARIANTS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_exported_runtime_matches_torch_fp32(runtime: str, precision: str, cfg: GeneratorConfig) -> None:
    g = tiny_generator(cfg, seed=3)
    ref, fast = engine(g, "torch"), engine(g, runtime, precision=precision)
    assert (fast.runtime.name, fast.runtime.precision) == (runtime, precision)
    x = torch.rand(2, 3, 19, 23)  # a batch of 2, odd sides: the graph's batch, height and width are free
    with torch.inference_mode():
        diff = (fast.forward(x) - ref.forward(x)).abs().max().item()
    assert fast.forward(x).shape == (2, 3, 19 * cfg.scale, 23 * cfg.scale)
    assert diff < (1e-4 if precision == "fp32" else 1e-2), diff  # bf16: the body rounded to 8 significant bits


@pytest.mark.parametrize("runtime,precision", VARIANTS)
def test_tiles_batches_16_bit_and_ensemble_through_an_exported_runtime(runtime: str, precision: str) -> None:
    """Tiled with exact context and batched through the exported graph = PyTorch in one piece
    (fp32: up to float rounding; ncnn's bf16 body: up to its rounding, against itself in one piece)."""
    g = tiny_generator(CONFIGS[0], seed=1)
    img = natural_image(45, 61, seed=2).astype(np.float32) / 255.0
    whole = engine(g, "torch" if precision == "fp32" else runtime, tile=4096, precision=precision).upscale_rgb(img, bits=16)
    tiled = engine(g, runtime, tile=16, batch=3, precision=precision)
    out = tiled.upscale_rgb(img, bits=16)
    assert out.dtype == np.uint16 and out.shape == whole.shape
    assert tiled.forward_passes >= 3  # 12 tiles in batches of 3
    # of 65535: float rounding only (bf16: where a tile's rounding to bf16 differs, 14 measured)
    assert np.abs(out.astype(int) - whole.astype(int)).max() <= (2 if precision == "fp32" else 32)
    views = engine(g, runtime, self_ensemble=8, precision=precision).upscale_rgb(img)  # flipped and transposed (non-contiguous) views
    views_ref = engine(g, "torch", self_ensemble=8).upscale_rgb(img)
    assert np.abs(views.astype(int) - views_ref.astype(int)).max() <= (1 if precision == "fp32" else 2)


@pytest.mark.parametrize("runtime", EXPORTED)
def test_alpha_and_16_bit_png_through_an_exported_runtime(runtime: str) -> None:
    g = tiny_generator(CONFIGS[1], seed=4)
    rgba = np.concatenate([natural_image(30, 40, seed=5), np.linspace(0, 255, 30 * 40).reshape(30, 40, 1).astype(np.uint8)], 2)
    dec = decode(encode(Encoded(rgba.astype(np.uint16) * 257 + 3, 16), "PNG"))  # a real 16-bit RGBA PNG
    assert dec.bits == 16 and dec.alpha is not None
    a, b = engine(g, runtime).upscale_decoded(dec), engine(g, "torch").upscale_decoded(dec)
    assert a.pixels.shape == b.pixels.shape == (120, 160, 4) and a.pixels.dtype == np.uint16
    assert np.array_equal(a.pixels[..., 3], b.pixels[..., 3])
    assert np.abs(a.pixels[..., :3].astype(int) - b.pixels[..., :3].astype(int)).max() <= 2


@pytest.mark.parametrize("runtime", EXPORTED)
def test_forced_runtime_refuses_a_precision_it_cannot_run(runtime: str) -> None:
    with pytest.raises(ValueError, match="runs fp32"):
        engine(tiny_generator(), runtime, precision="fp16" if "bf16" in PRECISIONS[runtime] else "bf16")
    with pytest.raises(ValueError, match="runtime must be one of"):
        engine(tiny_generator(), "tensorrt")


def test_imported_models_stay_on_pytorch(tmp_path: Path) -> None:
    pytest.importorskip("spandrel")
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet
    from core.config import from_dict
    from upscaled.models_cmd import cmd_import

    torch.manual_seed(0)
    torch.save(RRDBNet(num_filters=8, num_blocks=1, scale=4).state_dict(), tmp_path / "esrgan_x4.pth")
    cfg = from_dict({"paths": {"models": str(tmp_path / "models")}}, base_dir=tmp_path)
    assert cmd_import(cfg, tmp_path / "esrgan_x4.pth", None, None, None) == 0
    net, info = load_model(next((tmp_path / "models").glob("*.safetensors")))
    for runtime in ("openvino", "auto"):
        up = engine(net, runtime, info, runtime_cache=str(tmp_path / "cache.json"))
        assert up.runtime.name == "torch"
        assert up.upscale_rgb(natural_image(12, 12)).shape == (48, 48, 3)
    assert not (tmp_path / "cache.json").exists()  # nothing was probed


def test_auto_probes_once_per_model_version_and_cpu(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "runtimes.json"
    paths = [save_checkpoint(tmp_path / f"m{i}.safetensors", tiny_generator(seed=i), step=i) for i in range(2)]
    (g0, info0), (g1, info1) = load_model(tmp_path / "m0.safetensors"), load_model(tmp_path / "m1.safetensors")
    assert info0.version != info1.version and paths
    first = engine(g0, "auto", info0, precision="auto", runtime_cache=str(cache))
    data = json.loads(cache.read_text())
    (key, choice), = data["choices"].items()
    assert info0.version in key and cpu_identity() in key and f"{torch.get_num_threads()} threads" in key
    assert choice["runtime"] == first.runtime.name and choice["precision"] == first.runtime.precision
    assert set(choice["seconds_per_mp"]) == {"torch", *(label(r, p) for r, p in VARIANTS)}
    # The cache is honoured: rewrite the hint, and the next engine for that model obeys it unprobed.
    other = "onnxruntime" if first.runtime.name != "onnxruntime" else "openvino"
    choice["runtime"], choice["precision"] = other, "fp32"
    cache.write_text(json.dumps(data))
    again = engine(g0, "auto", info0, precision="auto", runtime_cache=str(cache))
    assert again.runtime.name == other
    assert json.loads(cache.read_text())["choices"][key]["runtime"] == other  # not probed again
    img = natural_image(20, 20).astype(np.float32) / 255.0
    assert np.abs(again.upscale_rgb(img).astype(int) - engine(g0, "torch", info0).upscale_rgb(img).astype(int)).max() <= 1
    # Another model version is probed and cached beside it.
    engine(g1, "auto", info1, precision="auto", runtime_cache=str(cache))
    keys = json.loads(cache.read_text())["choices"]
    assert len(keys) == 2 and any(info1.version in k for k in keys)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "choices": {}}).replace("{}", '{"K": {"runtime": "evil"}}')])
def test_a_broken_or_foreign_cache_only_costs_a_probe(tmp_path: Path, content: str) -> None:
    save_checkpoint(tmp_path / "m.safetensors", tiny_generator(), step=1)
    g, info = load_model(tmp_path / "m.safetensors")
    cache = tmp_path / "runtimes.json"
    key = cache_key(info.version, "auto", torch.get_num_threads())
    cache.write_text(content.replace('"K"', json.dumps(key)))
    up = engine(g, "auto", info, precision="auto", runtime_cache=str(cache))
    assert up.runtime.name in ("torch", *EXPORTED)
    assert json.loads(cache.read_text())["choices"][key]["runtime"] == up.runtime.name
    assert ProbeCache(cache).get(key)["runtime"] == up.runtime.name


def test_untracked_models_are_probed_but_not_cached(tmp_path: Path) -> None:
    up = engine(tiny_generator(), "auto", None, precision="auto", runtime_cache=str(tmp_path / "c.json"))
    assert up.runtime.name in ("torch", *EXPORTED) and not (tmp_path / "c.json").exists()


def test_an_onednn_isa_cap_below_bf16_means_fp32(monkeypatch) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert not cpu_has_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    native = " avx512_bf16" in Path("/proc/cpuinfo").read_text() or " amx_bf16" in Path("/proc/cpuinfo").read_text()
    assert cpu_has_native_bf16() == native


def test_daemon_serves_through_the_configured_runtime_and_says_so(tmp_path: Path) -> None:
    """`inference.runtime: openvino` in config.yaml: a real daemon logs it, `upscaled status`
    shows it, and its output is PyTorch's."""
    import subprocess
    import sys

    from PIL import Image

    from tests.daemon_helpers import ROOT, make_config, serve, stop, tiny_checkpoint, wait_for, write_image

    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    _, config = make_config(tmp_path, ckpt, inference={"runtime": "openvino", "precision": "fp32"})
    src = write_image(tmp_path / "staging" / "a.png", 40, 30, seed=3)
    log = tmp_path / "daemon.log"
    proc = serve(config, log=log)
    try:
        status = tmp_path / "status.json"
        wait_for(lambda: status.exists() and json.loads(status.read_text()).get("state") == "running", 90,
                 what=f"the daemon to be running: {log.read_text()[-2000:] if log.exists() else ''}")
        src.rename(tmp_path / "inbox" / "a.png")
        out = tmp_path / "outbox" / "a.png"
        wait_for(out.exists, 60, what="the output")
        r = subprocess.run([sys.executable, "-m", "upscaled", "status", "--config", str(config)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert "via openvino fp32" in r.stdout, r.stdout + r.stderr
        assert json.loads(status.read_text())["model"]["runtime"] == "openvino"
    finally:
        assert stop(proc) == 0
    assert "runtime openvino" in log.read_text()
    g, info = load_model(ckpt)
    ref = engine(g, "torch", info).upscale_rgb(np.asarray(Image.open(tmp_path / "done" / "a.png").convert("RGB")))
    assert np.abs(np.asarray(Image.open(out).convert("RGB")).astype(int) - ref.astype(int)).max() <= 1


def test_without_a_working_onnx_auto_serves_on_pytorch_and_a_forced_runtime_says_why(tmp_path: Path) -> None:
    """CI once met a machine with OpenVINO but no onnx (torch.onnx.export needs it): every
    `upscale` crashed in the probe. Here an `onnx` that fails to import shadows the real one."""
    from tests.conftest import run_cli, save_image, write_config
    from tests.daemon_helpers import tiny_checkpoint

    broken = tmp_path / "shadow" / "onnx"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('onnx is broken here on purpose')\n")
    env = {"PYTHONPATH": str(broken.parent), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    src = save_image(tmp_path / "in" / "a.png", natural_image(20, 16, seed=1))
    for runtime, rc in (("auto", 0), ("openvino", 2)):
        (tmp_path / runtime).mkdir()
        config = write_config(tmp_path / runtime, {"model": {"path": str(ckpt)},
                                                   "inference": {"device": "cpu", "runtime": runtime, "precision": "fp32"}})
        r = run_cli("upscale", str(src), "-o", str(tmp_path / runtime / "out"), "--config", str(config), env=env)
        if rc == 0:  # PyTorch serves, or ncnn, which needs no ONNX
            assert r.returncode == 0, r.stderr
            assert "ONNX export failed" in r.stderr and "openvino, onnxruntime not used" in r.stderr
            assert (tmp_path / runtime / "out" / "a.png").exists()
        else:
            assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
            assert "inference.runtime: expected auto or torch: the ONNX export failed here" in r.stderr


def test_ncnn_graph_is_written_for_every_layout_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    """ncnn reads its weights from a private folder made for the load, and removed after it."""
    import tempfile

    from model.fold import FoldedGenerator
    from model.ncnngraph import ncnn_graph
    from model.runtimes import NcnnRuntime

    pytest.importorskip("ncnn")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for cfg in CONFIGS:
        folded = FoldedGenerator(tiny_generator(cfg, seed=5))
        param, weights = ncnn_graph(folded)
        convs = sum(1 for m in folded.modules() if isinstance(m, torch.nn.Conv2d)) + 1  # + the tail's own weights
        assert param.count("Convolution ") == convs and len(weights) % 4 == 0
        run = NcnnRuntime({"fp32": (param, weights)}, 1)
        x = torch.rand(1, 3, 9, 13)
        with torch.inference_mode():
            assert (run(x) - folded(x)).abs().max().item() < 1e-4
    assert not list(tmp_path.iterdir())


def test_when_the_ncnn_graph_cannot_be_made_auto_probes_the_rest_and_forcing_it_says_why(monkeypatch) -> None:
    import model.runtimes as runtimes
    from core.config import ConfigError

    def broken(folded):
        raise NotImplementedError("a layer ncnn lacks")

    monkeypatch.setattr(runtimes, "ncnn_graph", broken)
    up = engine(tiny_generator(), "auto", None, precision="auto")
    assert up.runtime.name in ("torch", "openvino", "onnxruntime")
    with pytest.raises(ConfigError, match="the ncnn export failed here"):
        engine(tiny_generator(), "ncnn")
