"""Speed and memory benchmark: prints one table, every ratio measured in this one run.

    .venv/bin/python bench/benchmark.py            # the full benchmark (long on a 2-core CPU)
    .venv/bin/python bench/benchmark.py --quick    # fewer/smaller images, same measurements

Rows:
  1. bf16/fp32 matmul peak of this process; the default generator's throughput (output MP/s,
     GFLOP/s, share of both peaks) as a plain fp32 NCHW forward and through the engine.
  2. quality guard: the engine's fast path against fp32 on photo crops (PSNR of each against
     the original, difference in dB).
  3. daemon end-to-end throughput (images dropped into a real `upscaled serve`) over the bare
     engine's throughput on the same images: reduced crops of the training photos where they are
     present (--content), else synthetic gradients with noise, which PNG compresses worst.
     Timed in alternating rounds of ~10 s (see daemon_rows), with the daemon's CPU seconds by
     thread, and what other processes and the hypervisor took meanwhile.
  4. latency from one small file's arrival to its output being in place, minus model time (median of 5).
  5. peak RSS and seconds per output megapixel for one large image through `upscaled upscale`.
  6. one row per inference runtime and precision (model/runtimes.py) on centre crops of
     photos/val and mixed/val: s per output MP through the engine, PSNR-Y and its difference to
     torch fp32, and the ratio to SPAN (ncnn) timed on the same crops in the same run, the
     runtimes and SPAN interleaved image by image; plus what `inference.runtime: auto` picks.
     --emulate-avx2 reruns the benchmark with oneDNN (PyTorch's and OpenVINO's) and PyTorch's own
     kernels capped at AVX2 and fp32, as on a CPU without AVX-512 or native bf16. ONNX Runtime
     (MLAS) and ncnn have no such cap and still use every ISA the CPU has.
The same rows run on CUDA when a GPU is present (rows 1, 2 and 5 on the device).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imaging.quality import downscale, psnr_ssim_y  # noqa: E402
from model.checkpoint import BUNDLED_DEFAULT, load_generator  # noqa: E402
from model.engine import EngineOptions, Upscaler, cpu_has_native_bf16, reuse_freed_memory  # noqa: E402
from model.generator import Generator, GeneratorConfig  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "photos"  # val/ and train/; --photos (a GPU machine has a carried copy)
MIXED = ROOT.parent / "shared" / "data" / "mixed"
# An AVX2-only CPU, emulated: oneDNN (in PyTorch and in OpenVINO) and PyTorch's own vectorised
# kernels honour these caps, MKL the last one. ONNX Runtime's MLAS and ncnn dispatch on CPUID alone.
AVX2_CAPS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def matmul_peak(dtype: torch.dtype, device: str, n: int = 0, seconds: float = 2.0) -> dict:
    """GFLOP/s of the best matrix multiply this process runs in `dtype`, by two routes: torch's
    matmul (MKL/cuBLAS) and a 1x1 convolution in channels_last, which is a GEMM (M = pixels,
    K = N = channels) through oneDNN/cuDNN. On AMD CPUs MKL's fp32 GEMM takes a slower code path
    (about 200 against 480 GFLOP/s here), so the convolution route is the honest peak for convolutions.
    A GPU needs far larger products to reach its peak than a CPU does: 8192^3 and 256x256 pixels there."""

    def rate(fn, flops: float) -> float:
        return flops / time_call(fn, seconds, device) / 1e9

    cuda = device.startswith("cuda")
    n = n or (8192 if cuda else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c, side = 1024, 256 if cuda else 64
    conv = torch.nn.Conv2d(c, c, 1, bias=False).to(device, dtype).to(memory_format=torch.channels_last)
    x = torch.randn(1, c, side, side, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        mm = rate(lambda: a @ b, 2 * n**3)
        gemm_conv = rate(lambda: conv(x), 2 * c * c * side * side)
    return {"matmul": mm, "conv1x1": gemm_conv, "peak": max(mm, gemm_conv), "n": n, "side": side}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, min_seconds: float = 3.0, device: str = "cpu") -> float:
    fn()  # warm-up
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - t0 < min_seconds:
        fn()
        reps += 1
    sync(device)
    return (time.perf_counter() - t0) / reps


def synthetic_photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([0.5 + 0.4 * np.sin(x / 17 + y / 29), 0.5 + 0.4 * np.cos(y / 13 - x / 31),
                    0.5 + 0.3 * np.sin((x + y) / 23)], axis=2)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def photo_crops(val: Path, count: int, side: int) -> list[np.ndarray]:
    """Centre crops of the validation photos when present, else synthetic images."""
    files = sorted(val.rglob("*.png")) if val.is_dir() else []
    crops = []
    for f in files[:count]:
        a = np.asarray(Image.open(f).convert("RGB"))
        h, w = a.shape[:2]
        s = min(side, h, w)
        crops.append(a[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s])
    while len(crops) < count:
        crops.append(synthetic_photo(side, side, len(crops)))
    return crops


def generator_rows(gen, device: str, lr_side: int, label: str) -> list[dict]:
    """One tile per pass on a CPU (it is busy with one); 8 on a GPU, as the engine batches there."""
    flops_px = gen.flops_per_output_pixel()
    n = 8 if device.startswith("cuda") else 1
    out_px = n * (lr_side * gen.cfg.scale) ** 2
    rows = []
    x = torch.rand(n, 3, lr_side, lr_side, device=device)
    plain = gen.to(device).eval()

    def run_plain():
        with torch.inference_mode():
            plain(x)

    rows.append(("plain fp32 NCHW forward", time_call(run_plain, device=device)))
    for precision in ["fp32"] + (["bf16"] if device == "cpu" and cpu_has_native_bf16() else []) + \
            (["fp16"] if device.startswith("cuda") else []):
        up = Upscaler(gen, None, EngineOptions(device=device, precision=precision, tile=lr_side, batch=n))
        rows.append((f"engine {precision} (folded, channels_last)", time_call(lambda: up.forward(x), device=device)))
    c = gen.cfg
    return [
        {"model": f"{label} {c.blocks}x{c.channels}{'' if c.batchnorm else ' no-BN'} ({flops_px / 1e3:.0f} GFLOP/MP)",
         "path": name, "s_per_mp": t / (out_px / 1e6), "mp_per_s": out_px / 1e6 / t,
         "gflops": flops_px * out_px / t / 1e9}
        for name, t in rows
    ]


def quality_guard(gen, device: str, crops: list[np.ndarray]) -> dict:
    """The fast path against fp32 on the CPU: on a GPU, PyTorch's fp32 convolutions are TF32
    (10-bit mantissa) unless told otherwise, so the reference is computed where fp32 is fp32."""
    s = gen.cfg.scale
    ref = Upscaler(gen, None, EngineOptions(device="cpu", precision="fp32"))
    fast = Upscaler(gen, None, EngineOptions(device=device, precision="auto"))
    p_ref, p_fast = [], []
    for hr in crops:
        lr = downscale(hr, s).astype(np.float32) / 255.0
        hr_c = hr[: lr.shape[0] * s, : lr.shape[1] * s]
        p_ref.append(psnr_ssim_y(ref.upscale_rgb(lr), hr_c, s)[0])
        p_fast.append(psnr_ssim_y(fast.upscale_rgb(lr), hr_c, s)[0])
    return {"fast_precision": str(fast.dtype).replace("torch.", ""), "fast_device": str(fast.device), "psnr_fp32": float(np.mean(p_ref)),
            "psnr_fast": float(np.mean(p_fast)), "delta_db": float(np.mean(p_fast) - np.mean(p_ref))}


def photo_image(files: list[Path], w: int, h: int, seed: int) -> np.ndarray:
    """A w x h low-resolution photo: a random crop of a training photo, reduced (box filter, as a
    camera or a web page makes small images) from a random 1-3x larger area."""
    rng = np.random.default_rng(seed)
    with Image.open(files[seed % len(files)]) as im:
        im = im.convert("RGB")
        factor = min(rng.uniform(1.0, 3.0), im.width / w, im.height / h)
        cw, ch = int(w * factor), int(h * factor)
        x, y = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
        return np.asarray(im.resize((w, h), Image.Resampling.BOX, box=(x, y, x + cw, y + ch)))


def content_files(content: str, train: Path) -> list[Path]:
    """The photos the daemon rows are made of; [] means synthetic images."""
    if content == "synthetic":
        return []
    files = sorted(f for f in train.rglob("*") if f.suffix.lower() in PHOTO_EXTENSIONS) if train.is_dir() else []
    if not files and content == "photos":
        raise SystemExit(f"--content photos: no photos under {train}")
    return files


def write_images(folder: Path, specs: list[tuple[int, int, int]], photos: list[Path] = (), prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h, seed) in enumerate(specs):
        p = folder / f"{prefix}{i:04d}_{w}x{h}.png"
        px = photo_image(photos, w, h, seed) if photos else synthetic_photo(h, w, seed)
        Image.fromarray(px).save(p, compress_level=1)
        paths.append(p)
    return paths


TICK = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> dict:
    """Seconds the whole machine spent busy and stolen (by the hypervisor), from /proc/stat."""
    f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is counted in user already)
    return {"busy": (f[0] + f[1] + f[2] + f[5] + f[6]) / TICK, "steal": f[7] / TICK}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each of a process's threads, summed by kernel thread name
    (the daemon names its pipeline threads: daemon/worker.py name_os_thread)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        name = "io" if name.startswith("io-") else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def bare_engine_seconds(up: Upscaler, arrays: list[np.ndarray]) -> tuple[float, float, dict]:
    """Wall seconds, this process's CPU seconds and the machine's CPU use for the engine alone."""
    m0, c0, t0 = machine_cpu(), time.process_time(), time.perf_counter()
    for a in arrays:
        up.upscale_rgb(a)
    wall, cpu, m1 = time.perf_counter() - t0, time.process_time() - c0, machine_cpu()
    return wall, cpu, {k: m1[k] - m0[k] for k in m0}


def start_daemon(base: Path, model: Path, device: str, overrides: dict | None = None) -> tuple[subprocess.Popen, Path]:
    cfg = {"model": {"path": str(model)}, "inference": {"device": device},
           "paths": {"inbox": "inbox", "outbox": "outbox", "done": "done", "failed": "failed",
                     "work": "inbox/.work", "models": "models", "status": "status.json"},
           "watch": {"settle_seconds": 0.2}}
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
    base.mkdir(parents=True, exist_ok=True)
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for d in ("inbox", "outbox"):
        (base / d).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "upscaled", "serve", "--config", str(path), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        st = base / "status.json"
        if st.exists() and json.loads(st.read_text()).get("state") == "running":
            return proc, base
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {proc.stderr.read()}")
        time.sleep(0.2)
    raise RuntimeError("daemon did not become ready")


def stop_daemon(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_outputs(outbox: Path, count: int, timeout: float) -> float:
    # A flat scan every 20 ms: the watcher's own CPU time is taken from the daemon it times.
    deadline = time.time() + timeout
    while time.time() < deadline:
        with os.scandir(outbox) as it:
            n = sum(1 for e in it if e.name.endswith(".png") and not e.name.startswith("."))
        if n >= count:
            return time.perf_counter()
        time.sleep(0.02)
    raise TimeoutError(f"only {n} of {count} outputs after {timeout} s")


def drop_and_wait(files: list[Path], base: Path, expected: int, timeout: float) -> float:
    """Rename `files` into the daemon's inbox (complete when they appear); seconds until the
    outbox holds `expected` outputs."""
    t0 = time.perf_counter()
    for f in files:
        os.replace(f, base / "inbox" / f.name)
    return wait_outputs(base / "outbox", expected, timeout) - t0


def daemon_rows(model: Path, device: str, up: Upscaler, n_small: int, n_large: int, tmp: Path,
                overrides: dict | None = None, photos: list[Path] = (), round_seconds: float = 10.0) -> dict:
    """The daemon against the bare engine on the same images, in alternating rounds.

    On a shared machine the speed swings by more than the effect being measured (here 0.50 to
    0.65 s for the same image within a minute, and 128 against 229 s for the same set), so
    the images are split into rounds of about `round_seconds`, and each round is timed on the
    bare engine and through the daemon next to each other (B D D B B D ...): a swing longer
    than a round hits both sides alike. The daemon keeps running across rounds; a round's cost
    to it is one pipeline fill and drain, a few tens of ms (renames are complete at once, no
    settle wait, and the large images go first so a small one is last). CPU seconds, by thread,
    say where a gap comes from: the model's threads working longer (contention), other threads'
    work (decode, encode, watcher), or other processes and the hypervisor (noise).
    """
    from imaging.images import decode

    specs = [(1024, 768, 1000 + i) for i in range(n_large)] + [(256, 256, i) for i in range(n_small)]
    staged = write_images(tmp / "staged", specs, photos)
    arrays = [decode(f).rgb for f in staged]
    warm = write_images(tmp / "warm", [(1024, 768, 99), (256, 256, 98)], photos, prefix="warm")
    # Each shape once on both sides first (no first-run costs in the rounds), which also gives
    # the seconds per image that size the rounds.
    t_large, t_small = (bare_engine_seconds(up, [decode(f).rgb])[0] for f in warm)
    estimate = t_large * n_large + t_small * n_small
    n_rounds = max(1, min(n_small, round(estimate / round_seconds)))
    rounds = [list(range(r, n_large, n_rounds)) + [n_large + i for i in range(r, n_small, n_rounds)] for r in range(n_rounds)]
    proc, base = start_daemon(tmp / "d", model, device, overrides)
    bare_t, daemon_t, bare_cpu = [], [], 0.0
    mach = {"bare": {"busy": 0.0, "steal": 0.0}, "daemon": {"busy": 0.0, "steal": 0.0}}
    by_thread: dict[str, float] = {}
    try:
        drop_and_wait(warm, base, 2, 600)  # the daemon sees both shapes once too
        expected = 2
        for r, idx in enumerate(rounds):
            for side in (("bare", "daemon") if r % 2 == 0 else ("daemon", "bare")):
                if side == "bare":
                    wall, cpu, m = bare_engine_seconds(up, [arrays[i] for i in idx])
                    bare_t.append(wall)
                    bare_cpu += cpu
                else:
                    expected += len(idx)
                    threads0, m0 = thread_cpu(proc.pid), machine_cpu()
                    daemon_t.append(drop_and_wait([staged[i] for i in idx], base, expected, max(600, estimate * 5)))
                    threads1, m1 = thread_cpu(proc.pid), machine_cpu()
                    m = {k: m1[k] - m0[k] for k in m0}
                    for k, v in threads1.items():
                        by_thread[k] = by_thread.get(k, 0.0) + v - threads0.get(k, 0.0)
                for k in m:
                    mach[side][k] += m[k]
        # latency: small files one at a time, each into an idle daemon; the median of 5, as one
        # sample on a shared machine varies by tens of ms
        singles = write_images(tmp / "single", [(64, 64, 7 + i) for i in range(5)], prefix="single")
        model_time = time_call(lambda: up.upscale_rgb(np.asarray(Image.open(singles[0]), np.float32) / 255), 1.0)
        latencies = []
        for small in singles:
            time.sleep(1.0)
            t0 = time.perf_counter()
            os.replace(small, base / "inbox" / small.name)
            deadline = time.time() + 60
            while not (base / "outbox" / small.name).exists():
                if time.time() > deadline:
                    raise TimeoutError(f"{small.name} never came out")
                time.sleep(0.002)
            latencies.append(time.perf_counter() - t0)
        latency = float(np.median(latencies))
    finally:
        stop_daemon(proc)
    bare, e2e = sum(bare_t), sum(daemon_t)
    daemon_cpu = sum(by_thread.values())
    out_mp = sum(w * h * up.scale**2 for w, h, _ in specs) / 1e6
    content = f"photos ({len(photos)} files under {os.path.commonpath(photos)})" if photos else "synthetic"
    return {"images": f"{n_small} x 256x256 + {n_large} x 1024x768", "content": content, "out_mp": out_mp,
            "bare_s": bare, "daemon_s": e2e, "ratio": bare / e2e, "rounds": n_rounds,
            "round_ratios": [round(b / d, 3) for b, d in zip(bare_t, daemon_t)],
            "bare_cpu_s": bare_cpu, "daemon_cpu_s": daemon_cpu, "daemon_cpu_by_thread": {k: round(v, 2) for k, v in by_thread.items()},
            # CPU the rest of the machine took meanwhile: other processes (busy minus ours) and steal
            "others_cpu_s": {"bare": mach["bare"]["busy"] - bare_cpu, "daemon": mach["daemon"]["busy"] - daemon_cpu},
            "steal_s": {k: mach[k]["steal"] for k in mach},
            "latency_ms": latency * 1e3, "latencies_ms": [round(v * 1e3, 1) for v in latencies], "model_ms": model_time * 1e3, "overhead_ms": (latency - model_time) * 1e3}


def large_image_row(model: Path, device: str, w: int, h: int, tmp: Path) -> dict:
    src = tmp / "large" / f"large_{w}x{h}.jpg"
    src.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_photo(h, w, 3)).save(src, quality=92)
    cfg = tmp / "large.yaml"
    cfg.write_text(yaml.safe_dump({"inference": {"device": device}}))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "upscaled", "upscale", str(src), "-o", str(tmp / "large_out"),
                        "--model", str(model), "--config", str(cfg), "-q"], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(r.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"input": f"{w}x{h}", "out_mp": w * h * 16 / 1e6, "seconds": dt, "s_per_mp": dt / (w * h * 16 / 1e6),
            "peak_rss_gb": max(peak, before) / 1e6}


def cpu_flags() -> dict:
    """The CPU and the flags that decide the fast paths, with any cap this process runs under."""
    name, flags = "unknown", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown":
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")
    return {"model": name, "flags": [f for f in wanted if f in flags],
            "caps": {k: os.environ[k] for k in AVX2_CAPS if k in os.environ}}


def runtime_isa(up: Upscaler) -> str:
    """What ISA a runtime's convolutions really run: OpenVINO says per layer; the others by what caps them."""
    name = up.runtime.name
    if name == "openvino":
        kinds = {op.get_rt_info()["primitiveType"].astype(str) for op in up.runtime.compiled.get_runtime_model().get_ordered_ops()}
        return ", ".join(sorted(k for k in kinds if "conv" in k)) or "?"
    if name == "onnxruntime":
        return "MLAS, not cappable: every ISA of this CPU"
    if name == "ncnn":
        return "ncnn (Winograd 3x3), not cappable: every ISA of this CPU"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"oneDNN capped at {cap}, ATen {torch.backends.cpu.get_cpu_capability()}" if cap else \
        f"oneDNN uncapped, ATen {torch.backends.cpu.get_cpu_capability()}"


def val_crops(folders: list[Path], side: int) -> list[tuple[str, np.ndarray]]:
    """Centre crops (at most side x side) of every val image, named set/file."""
    out = []
    for folder in folders:
        for f in sorted(folder.rglob("*.png")):
            a = np.asarray(Image.open(f).convert("RGB"))
            h, w = a.shape[:2]
            sh, sw = min(side, h) // 4 * 4, min(side, w) // 4 * 4
            out.append((f"{folder.parent.name}/{f.name}", a[(h - sh) // 2 : (h - sh) // 2 + sh, (w - sw) // 2 : (w - sw) // 2 + sw]))
    return out


def runtime_rows(model: Path, folders: list[Path], side: int, tmp: Path) -> dict:
    """Row 6 (see the module docstring). Every engine runs with the tile and batch the service
    would use; each image goes through all of them and SPAN back to back, in an order that turns
    by one each image, so that a swing in a shared machine's speed hits all alike."""
    from model.checkpoint import load_model
    from model.peers import PeerUnavailable, span
    from model.runtimes import EXPORTED, PRECISIONS, installed

    gen, info = load_model(model)
    variants = [("torch", "fp32")] + ([("torch", "bf16")] if cpu_has_native_bf16() else []) + \
        [(r, p) for r in EXPORTED if installed(r) for p in PRECISIONS[r]]
    engines = {f"{r} {p}": Upscaler(gen, info, EngineOptions(device="cpu", precision=p, runtime=r)) for r, p in variants}
    t0 = time.perf_counter()
    auto = Upscaler(gen, info, EngineOptions(device="cpu", runtime="auto", runtime_cache=str(tmp / "runtimes.json")))
    chosen = f"{auto.runtime.name} {auto.runtime.precision}"
    res = {"cpu": cpu_flags(), "model": info.version, "auto": chosen, "auto_probe_s": time.perf_counter() - t0,
           "isa": {k: runtime_isa(up) for k, up in engines.items()}, "side": side}
    del auto
    try:
        peer = span(gen.descriptor.scale)
        res["span_isa"] = "ncnn, not cappable: every ISA of this CPU"
    except PeerUnavailable as e:
        peer, res["span_error"] = None, str(e)
    names = list(engines) + (["SPAN"] if peer else [])
    sets: dict[str, dict] = {}
    crops = val_crops(folders, side)
    if not crops:
        raise SystemExit(f"no val images (*.png) under {', '.join(map(str, folders))}: see --val")
    for i, (name, hr) in enumerate(crops):
        s = gen.descriptor.scale
        lr = downscale(hr, s).astype(np.float32) / 255.0
        st = sets.setdefault(name.split("/")[0], {"mp": 0.0, "seconds": {n: 0.0 for n in names}, "psnr": {n: [] for n in names}})
        st["mp"] += hr.shape[0] * hr.shape[1] / 1e6
        for k in range(len(names)):
            n = names[(i + k) % len(names)]
            t = time.perf_counter()
            out = peer(lr) if n == "SPAN" else engines[n].upscale_rgb(lr)
            st["seconds"][n] += time.perf_counter() - t
            st["psnr"][n].append(psnr_ssim_y(out, hr, s)[0])
    res["sets"] = {k: {"images": len(v["psnr"][names[0]]), "out_mp": v["mp"],
                       "s_per_mp": {n: v["seconds"][n] / v["mp"] for n in names},
                       "psnr_y": {n: float(np.mean(v["psnr"][n])) for n in names}} for k, v in sets.items()}
    return res


def runtime_table(r: dict) -> list[str]:
    c = r["cpu"]
    lines = [f"inference runtimes on {c['model']} (flags: {' '.join(c['flags'])}; caps: "
             f"{' '.join(f'{k}={v}' for k, v in c['caps'].items()) or 'none'}), centre crops of at most {r['side']} px, "
             f"SPAN timed on the same crops in the same run; auto picks {r['auto']} (probe and build {r['auto_probe_s']:.1f} s)",
             "", "| val set | runtime | precision | s / output MP | x SPAN | PSNR-Y dB | vs torch fp32 |", "|---|---|---|---:|---:|---:|---:|"]
    for name, st in r["sets"].items():
        ref = st["psnr_y"]["torch fp32"]
        span_t = st["s_per_mp"].get("SPAN")
        for n, t in st["s_per_mp"].items():
            runtime, _, precision = n.partition(" ")
            ratio = f"{t / span_t:.2f}" if span_t else "-"
            delta = "-" if n == "SPAN" else f"{st['psnr_y'][n] - ref:+.4f}"
            mark = " (auto)" if n == r["auto"] else ""
            lines.append(f"| {name} ({st['images']} images, {st['out_mp']:.1f} MP) | {runtime}{mark} | {precision or 'ncnn default'} | "
                         f"{t:.3f} | {ratio} | {st['psnr_y'][n]:.3f} | {delta} |")
    lines += ["", "ISA each runtime ran: " + "; ".join(f"{k}: {v}" for k, v in r["isa"].items()) +
              (f"; SPAN: {r['span_isa']}" if "span_isa" in r else f"; SPAN: {r.get('span_error')}")]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer and smaller images (same measurements)")
    ap.add_argument("--model", default=str(BUNDLED_DEFAULT), help="checkpoint (default: the bundled model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip", nargs="*", default=[], choices=["generator", "quality", "daemon", "large", "runtimes"])
    ap.add_argument("--emulate-avx2", action="store_true", help="cap oneDNN and PyTorch's kernels at AVX2 (no AVX-512, "
                    "no native bf16), as on an AVX2-only CPU; ONNX Runtime and ncnn (SPAN) cannot be capped")
    ap.add_argument("--runtime-side", type=int, default=768, help="runtimes row: centre crops of at most this side (HR px)")
    ap.add_argument("--val", nargs="*", default=[str(PHOTOS / "val"), str(MIXED / "val")], help="runtimes row: val folders")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--content", choices=["auto", "photos", "synthetic"], default="auto",
                    help="what the daemon rows' images show: reduced crops of the training photos (auto: when "
                         "they are present) or synthetic gradients with noise (compress worse: a PNG encoder's worst case)")
    ap.add_argument("--photos", metavar="DIR", default=str(PHOTOS),
                    help="folder with val/ (quality crops) and train/ (daemon images) photos (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config value for the daemon under test (for A/B runs), e.g. daemon.io_nice=0")
    args = ap.parse_args()
    if args.emulate_avx2 and any(os.environ.get(k) != v for k, v in AVX2_CAPS.items()):
        # The caps are read when the libraries load: start again with them in the environment.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_CAPS})
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1:
            ap.error(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    # The engine sets this on its first use; set it first so every row, the plain forward's
    # too, runs with the same allocator (it is a property of the process, not of a path).
    reuse_freed_memory()
    gen, info = load_generator(args.model)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "device": device, "model": info.version,
                 "served_generator": info.generator.to_dict(), "threads": torch.get_num_threads(),
                 "cpu": platform.processor() or platform.machine(), "native_bf16": cpu_has_native_bf16(),
                 "quick": args.quick, "daemon_config": overrides, "cpu_flags": cpu_flags()}
    if device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    tmp = Path(tempfile.mkdtemp(prefix="upscaled-bench-"))
    try:
        res["fp32_peaks"] = matmul_peak(torch.float32, device)
        res["fp32_peak_gflops"] = res["fp32_peaks"]["peak"]
        # Without native bf16 (an AVX2-only CPU) a 2048^3 bf16 matmul is emulated at well under
        # 1 GFLOP/s: a minute per call, and no path of the engine uses it there (auto picks fp32).
        if device != "cpu" or cpu_has_native_bf16():
            res["bf16_peaks"] = matmul_peak(torch.bfloat16, device)
            res["bf16_peak_gflops"] = res["bf16_peaks"]["peak"]
        if "generator" not in args.skip:
            side = 96 if args.quick else 128
            res["generator"] = generator_rows(gen, device, side, "served")
            if gen.cfg != GeneratorConfig():  # the design's default size too, for the peak-share goal
                res["generator"] += generator_rows(Generator(GeneratorConfig()), device, side, "design default")
        if "quality" not in args.skip:
            res["quality"] = quality_guard(gen, device, photo_crops(Path(args.photos) / "val", 4 if args.quick else 10, 96 if args.quick else 192))
        up = Upscaler(gen, info, EngineOptions(device=device))
        if "daemon" not in args.skip:
            res["daemon"] = daemon_rows(Path(args.model), device, up, 10 if args.quick else 100,
                                        1 if args.quick else 10, tmp, overrides, content_files(args.content, Path(args.photos) / "train"))
        if "large" not in args.skip:
            w, h = (1500, 1000) if args.quick else (6000, 4000)
            res["large"] = large_image_row(Path(args.model), device, w, h, tmp)
        if "runtimes" not in args.skip and device == "cpu":
            res["runtimes"] = runtime_rows(Path(args.model), [Path(v) for v in args.val], 256 if args.quick else args.runtime_side, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def table(r: dict) -> str:
    lines = [f"upscaled benchmark {r['date']} on {r['device']} ({r.get('gpu') or r['cpu']}, {r['threads']} threads, "
             f"native bf16: {r['native_bf16']}){' [quick]' if r['quick'] else ''}",
             f"served model {r['model']}" + (f", daemon config {r['daemon_config']}" if r.get("daemon_config") else ""), "",
             f"matrix-multiply peak of this process, GFLOP/s (torch matmul {r['fp32_peaks'].get('n', 2048)}^3 | 1x1 conv GEMM "
             f"1024 ch, {r['fp32_peaks'].get('side', 64)}^2 px): " +
             ", ".join(f"{k} {r[k + '_peaks']['matmul']:.0f} | {r[k + '_peaks']['conv1x1']:.0f}" for k in ("fp32", "bf16") if k + "_peaks" in r) +
             f"; peak = the better: fp32 {r['fp32_peak_gflops']:.0f}, bf16 " +
             (f"{r['bf16_peak_gflops']:.0f}" if "bf16_peak_gflops" in r else "not measured (no native bf16: emulated, unused)"), ""]
    if "generator" in r:
        lines += ["| generator | path | s / output MP | output MP/s | GFLOP/s | % fp32 peak | % bf16 peak |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        native = "bf16_peak_gflops" in r
        for g in r["generator"]:
            bf = f"{100 * g['gflops'] / r['bf16_peak_gflops']:.0f}%" if native else "n/a (emulated bf16)"
            lines.append(f"| {g['model']} | {g['path']} | {g['s_per_mp']:.3f} | {g['mp_per_s']:.3f} | {g['gflops']:.0f} | "
                         f"{100 * g['gflops'] / r['fp32_peak_gflops']:.0f}% | {bf} |")
        lines.append("")
    if "quality" in r:
        q = r["quality"]
        lines.append(f"quality guard: fast path ({q['fast_precision']} on {q.get('fast_device', 'cpu')}) {q['psnr_fast']:.3f} dB vs fp32 on the CPU "
                     f"{q['psnr_fp32']:.3f} dB: {q['delta_db']:+.4f} dB (limit 0.05 dB)")
    if "daemon" in r:
        d = r["daemon"]
        rr = d.get("round_ratios", [])
        lines.append(f"daemon end-to-end: {d['images']} of {d.get('content', 'synthetic')} ({d['out_mp']:.0f} output MP) "
                     f"in {d.get('rounds', 1)} alternating round(s): bare engine {d['bare_s']:.1f} s, daemon {d['daemon_s']:.1f} s, "
                     f"{d['out_mp'] / d['bare_s']:.2f} vs {d['out_mp'] / d['daemon_s']:.2f} output MP/s, "
                     f"throughput ratio {d['ratio']:.3f} (goal >= 0.9)" +
                     (f"; rounds {min(rr):.3f}-{max(rr):.3f}" if len(rr) > 1 else ""))
        if "daemon_cpu_by_thread" in d:
            threads = ", ".join(f"{k} {v:.1f}" for k, v in sorted(d["daemon_cpu_by_thread"].items(), key=lambda kv: -kv[1]) if v >= 0.05)
            o, st = d["others_cpu_s"], d["steal_s"]
            lines.append(f"  CPU seconds: bare engine {d['bare_cpu_s']:.1f}, daemon {d['daemon_cpu_s']:.1f} ({threads}); "
                         f"meanwhile other processes {o['bare']:.1f} / {o['daemon']:.1f}, steal {st['bare']:.1f} / {st['daemon']:.1f} (bare / daemon)")
        lat = d.get("latencies_ms", [])
        lines.append(f"latency, one 64x64 file: {d['latency_ms']:.0f} ms arrival-to-output" +
                     (f" (median of {len(lat)}: {min(lat):.0f}-{max(lat):.0f} ms)" if len(lat) > 1 else "") +
                     f", model {d['model_ms']:.0f} ms, overhead {d['overhead_ms']:.0f} ms (goal < 100 ms)")
    if "large" in r:
        big = r["large"]
        lines.append(f"large image {big['input']} -> {big['out_mp']:.0f} output MP via `upscaled upscale`: "
                     f"{big['seconds']:.0f} s ({big['s_per_mp']:.2f} s per output MP), peak RSS {big['peak_rss_gb']:.2f} GB")
    if "runtimes" in r:
        lines += [""] + runtime_table(r["runtimes"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
