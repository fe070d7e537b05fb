"""Tiled, batched inference: an image in, an image `scale` times larger out, on CPU or CUDA.

Seamless tiling by context cropping: every tile is run with `overlap` extra low-resolution
pixels of real image around it and only its centre is kept. With `overlap` at least the
generator's receptive radius the result is identical to untiled inference; all tiles share one
input shape (border tiles are shifted inward instead of shrunk), so they batch.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from loguru import logger

from imaging.images import Decoded, Encoded, assemble, unit_float
from model.checkpoint import CheckpointInfo
from model.fold import FoldedGenerator
from model.foreign import DEFAULT_CONTEXT, DEFAULT_FEATHER
from model.generator import Generator
from model.runtimes import ProbeCache, default_cache_path, select_runtime

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENSEMBLES = (1, 2, 4, 8)


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto: bf16 where the CPU has native bf16, fp16 on CUDA, else fp32
    tile: int = 0  # low-resolution tile side in pixels; 0 = chosen from available memory
    overlap: int = -1  # context pixels around each tile; -1 = the model's receptive radius (exact)
    batch: int = 0  # tiles per forward pass; 0 = chosen from available memory
    threads: int = 0  # CPU threads; 0 = all cores
    memory_budget_mb: int = 0  # 0 = a share of what the device has free
    self_ensemble: int = 1  # 1, 2, 4 or 8 flipped/transposed views averaged (see Upscaler._run)
    runtime: str = "torch"  # torch | auto | openvino | onnxruntime | ncnn (model/runtimes.py); the service config defaults to auto
    runtime_cache: str = ""  # the probe's cache file; "" = $XDG_CACHE_HOME/upscaled/runtimes.json


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX or AVX-512 BF16); elsewhere bf16 is emulated and slow.

    ONEDNN_MAX_CPU_ISA set below the bf16 ISAs (AVX2, AVX512_CORE, ...) counts as no native bf16:
    oneDNN then has no bf16 kernels, which is how an AVX2-only CPU is emulated (bench/benchmark.py).
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and cap not in ("ALL", "DEFAULT") and not any(k in cap for k in ("BF16", "AMX", "AVX10", "AVX512_CORE_FP16")):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


_MALLOC_TUNED = False


def reuse_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of handing it back to the kernel.

    Every forward pass allocates and frees activations of tens to hundreds of MB. By default
    glibc serves each from a fresh mmap (above its mmap threshold, or from any thread but the
    main one) and unmaps it on free, so every pass page-faults all of its memory in again: 2.9
    million faults and 30% of the engine's time on 30 x 256^2 + 3 x 1024x768 images here, 5 s
    of 11 s in the kernel (bench/results/2026-12-01.md). One arena, no mmap below 1 GB and no trimming below 1 GB of free top
    make later passes reuse the same pages. The cost: the process keeps its high-water mark of
    heap (bounded by the tile budget) instead of returning it between images.
    Returns False where the C library is not glibc (musl, macOS), which keeps its defaults.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    _MALLOC_TUNED = bool(mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_THRESHOLD, 1 << 30)
                         and mallopt(M_TRIM_THRESHOLD, 1 << 30))
    return _MALLOC_TUNED


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _view(x: torch.Tensor, k: int, undo: bool = False) -> torch.Tensor:
    """Self-ensemble view k of an N x C x H x W batch (bit 0: flip left-right, bit 1: up-down,
    bit 2: then transpose), or (undo) its inverse: transpose first, then the same flips."""
    flips = [d for bit, d in ((1, -1), (2, -2)) if k & bit]
    if undo and k & 4:
        x = x.transpose(-1, -2)
    if flips:
        x = x.flip(flips)
    if not undo and k & 4:
        x = x.transpose(-1, -2)
    return x


def _ramp(n: int, band: int) -> np.ndarray:
    """Blend weights along one side of a tile: rising from 0 to 1 over its first `band` pixels."""
    w = np.ones(n, dtype=np.float32)
    if band:
        w[:band] = (np.arange(band, dtype=np.float32) + 0.5) / band
    return w


@dataclass(frozen=True)
class Tile:
    in_y: int  # input box top-left and size (all tiles of one image share the size)
    in_x: int
    out_y0: int  # output rows/cols this tile owns, in image coordinates (low-res units)
    out_y1: int
    out_x0: int
    out_x1: int


def _bands(n: int, tile: int, overlap: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Split 0..n into bands of at most `tile`; returns (input size, [(in_start, own_start, own_end)])."""
    if n <= tile + 2 * overlap:
        return n, [(0, 0, n)]
    count = math.ceil(n / tile)
    edges = [round(i * n / count) for i in range(count + 1)]
    size = max(b - a for a, b in zip(edges, edges[1:])) + 2 * overlap
    bands = []
    for a, b in zip(edges, edges[1:]):
        start = min(max(a - overlap, 0), n - size)
        bands.append((start, a, b))
    return size, bands


def plan_tiles(h: int, w: int, tile: int, overlap: int) -> tuple[tuple[int, int], list[Tile]]:
    th, rows = _bands(h, tile, overlap)
    tw, cols = _bands(w, tile, overlap)
    tiles = [Tile(ry, cx, ra, rb, ca, cb) for ry, ra, rb in rows for cx, ca, cb in cols]
    return (th, tw), tiles


class ImageTooLarge(ValueError):
    """An image a model that cannot be tiled (tiling: internal) cannot take in one piece."""


class Upscaler:
    """A resident model ready to upscale images; one per device.

    Our own generator runs folded (model/fold.py) and tiled with exact context: every tile sees
    its receptive radius of real pixels around it and keeps only its centre, so tiling changes
    nothing. An imported model (model/foreign.py) is run as spandrel describes it: in a
    precision it supports, padded to its size rules, and tiled by its advice — `supported`:
    tiles with context and a feathered blend where neighbours meet (its receptive field is not
    known, so seams are blended rather than avoided), `discouraged`: the largest tile that fits
    in memory, `internal`: the whole image in one piece or a clear refusal.
    """

    def __init__(self, generator: nn.Module, info: CheckpointInfo | None = None, opts: EngineOptions = EngineOptions()):
        self.opts = opts
        self.info = info
        self.device = resolve_device(opts.device)
        self.dtype = resolve_precision(opts.precision, self.device)
        if self.device.type == "cpu" and opts.threads > 0:
            torch.set_num_threads(opts.threads)
        if self.device.type == "cpu":
            reuse_freed_memory()
        self.descriptor = generator.descriptor
        self.scale = self.descriptor.scale
        self.tiling = self.descriptor.tiling
        known = self.descriptor.receptive_radius >= 0
        self.overlap = opts.overlap if opts.overlap >= 0 else (self.descriptor.receptive_radius if known else DEFAULT_CONTEXT)
        # Exact context needs no blending; an unknown receptive field gets a feathered seam.
        self.feather = 0 if known else min(DEFAULT_FEATHER, self.overlap)
        if opts.self_ensemble not in ENSEMBLES:
            raise ValueError(f"self_ensemble must be one of {ENSEMBLES}, got {opts.self_ensemble!r}")
        self.ensemble = opts.self_ensemble
        if isinstance(generator, Generator):
            self.model = FoldedGenerator(generator, self.dtype).to(self.device, memory_format=torch.channels_last)
            # Bytes of activation memory per output pixel of one tile: the widest tensors are the
            # 4*ch conv output before PixelShuffle and the ch-channel full-resolution maps, a few
            # alive at once; 4 bytes each, a bound for the fp32 ends and the bf16/fp16 body.
            self._bytes_per_out_px = 3 * generator.cfg.channels * 4 * 2
        else:
            # An imported model runs in the configured precision only where spandrel says it can.
            supported = {torch.float32: True, torch.bfloat16: self.descriptor.supports_bfloat16,
                         torch.float16: self.descriptor.supports_half}
            if not supported[self.dtype]:
                logger.info("{} does not support {}; running it in fp32", self.descriptor.arch,
                            str(self.dtype).replace("torch.", ""))
                self.dtype = torch.float32
            self.model = generator.to_dtype(self.dtype).to(self.device, memory_format=torch.channels_last)
            self._bytes_per_out_px = generator.spec.bytes_per_out_px
        # What runs each batch: PyTorch, or our generator exported to a faster runtime where the
        # probe measured one faster on this CPU (model/runtimes.py); an exported graph runs fp32.
        self.runtime = select_runtime(
            self.model, self.dtype, generator, self.device, info.version if info else None, opts.runtime,
            torch.get_num_threads(), self.overlap * 2 + 64,
            ProbeCache(Path(opts.runtime_cache) if opts.runtime_cache else default_cache_path()),
            precision_auto=opts.precision == "auto")
        if self.runtime.name != "torch":
            self.dtype = torch.float32
        self.forward_passes = 0  # for tests and benchmarks: how the work was batched

    @property
    def version(self) -> str:
        return self.info.version if self.info else "untracked"

    def memory_budget(self) -> int:
        """Bytes one forward pass may use: inference.memory_budget_mb, else a share of what is free."""
        budget = self.opts.memory_budget_mb << 20
        if not budget:
            share = 0.5 if self.device.type == "cuda" else 0.25
            budget = min(int(available_memory_bytes(self.device) * share), (8 << 30) if self.device.type == "cuda" else (2 << 30))
        return budget

    def tile_and_batch(self) -> tuple[int, int]:
        """Tile side and batch size: from config, else from the memory the device has free."""
        budget = self.memory_budget()
        tile = self.opts.tile
        if self.tiling == "internal":
            return 1 << 30, 1  # never tiled: the whole image, one at a time (see _check_whole)
        if self.tiling == "discouraged" and not tile:
            # The largest tile the budget allows (at batch 1): most images then run in one piece.
            tile = max(64, int(math.sqrt(budget / (self.scale**2 * self._bytes_per_out_px))) - 2 * self.overlap)
            return tile // 8 * 8, 1
        if not tile:
            # Largest multiple of 32 whose padded tile fits the budget at batch 1; 512 is enough to
            # keep any device busy, 64 is the least that keeps overlap overhead reasonable.
            tile = 512
            while tile > 64 and (tile + 2 * self.overlap) ** 2 * self.scale**2 * self._bytes_per_out_px > budget:
                tile -= 32
        batch = self.opts.batch
        if not batch:
            per = (tile + 2 * self.overlap) ** 2 * self.scale**2 * self._bytes_per_out_px
            batch = max(1, min(8 if self.device.type == "cuda" else 1, budget // max(per, 1)))
        return tile, batch

    def working_set(self, size: tuple[int, int]) -> int:
        """Bytes the forward passes over an image of `size` = (W, H) hold at once (a batch of
        tiles; the whole image for a model that cannot be tiled), beside its input and output."""
        w, h = size
        if self.tiling == "internal":
            return w * h * self.scale**2 * self._bytes_per_out_px
        tile, batch = self.tile_and_batch()
        tw, th = min(w, tile) + 2 * self.overlap, min(h, tile) + 2 * self.overlap
        return min(self.memory_budget(), tw * th * self.scale**2 * self._bytes_per_out_px * batch)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W float in [0, 1] (any device) -> clamped float32 output on the CPU."""
        return self._run(x).float().clamp_(0, 1).cpu()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """One batch through the model; with self-ensemble, the mean of the model's answers for
        the batch seen flipped left-right, up-down and transposed (1, 2, 4 or 8 of those views),
        each turned back. A network trained on flipped and rotated crops errs differently on each
        view, so the mean errs less: +0.057, +0.105 and +0.132 dB for 2, 4 and 8 views with the
        bundled model on the val photos, at 2, 4 and 8 times the time (README, "The bundled models")."""
        self.forward_passes += 1
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # 8-bit input, converted here: a quarter of the bytes to copy and hold
            x = x.float().mul_(1 / 255.0)
        if self.ensemble == 1:
            return self.runtime(x)
        total = None
        for k in range(self.ensemble):  # bit 0: flip left-right, bit 1: up-down, bit 2: transpose
            y = _view(self.runtime(_view(x, k)), k, undo=True)
            total = y if total is None else total.add_(y)
        return total.mul_(1 / self.ensemble)

    @torch.inference_mode()
    def upscale_rgb(
        self,
        rgb: np.ndarray,
        bits: int = 8,
        progress: Callable[[int, int], None] | None = None,
        rgbx: bool = False,
    ) -> np.ndarray:
        """H x W x 3 float32 in [0, 1] (or uint8, value / 255) -> (sH) x (sW) x 3 uint8/uint16, tile by tile.

        The output is quantized tile by tile (on the device), so memory never holds
        full-resolution floats. On CUDA out-of-memory the image is retried with smaller tiles.
        rgbx (8-bit only): the result is the RGB view of an H x W x 4 buffer, which Pillow can
        encode in place (imaging.images.encode_to) instead of copying it into its own 4-byte
        pixels first: for a 24000x16000 JPEG, 1.5 GB held once instead of 1.15 GB + 1.5 GB.
        """
        tile, batch = self.tile_and_batch()
        if self.tiling == "internal":
            h, w = rgb.shape[:2]
            need = h * w * self.scale**2 * self._bytes_per_out_px
            if need > self.memory_budget():
                raise ImageTooLarge(
                    f"a {w}x{h} image is too large for the {self.descriptor.arch} model, which must see the whole image "
                    f"at once (it cannot be tiled): it needs about {need / 2**30:.1f} GiB, the memory budget is "
                    f"{self.memory_budget() / 2**30:.1f} GiB (inference.memory_budget_mb)")
        while True:
            try:
                return self._upscale_tiled(rgb, bits, tile, batch, progress, rgbx and bits == 8)
            except torch.cuda.OutOfMemoryError:
                if self.tiling == "internal":  # smaller tiles are not an option for it
                    torch.cuda.empty_cache()
                    raise ImageTooLarge(f"a {rgb.shape[1]}x{rgb.shape[0]} image does not fit in the GPU's memory for the "
                                        f"{self.descriptor.arch} model, which cannot be tiled") from None
                if tile <= 32 and batch == 1:
                    raise
                torch.cuda.empty_cache()
                tile, batch = (tile, batch // 2) if batch > 1 else (max(32, tile // 2), 1)
                logger.warning("CUDA out of memory; retrying with tile {} and batch {}", tile, batch)

    def _upscale_tiled(self, rgb: np.ndarray, bits: int, tile: int, batch: int, progress, rgbx: bool = False) -> np.ndarray:
        h, w, _ = rgb.shape
        s = self.scale
        (th, tw), tiles = plan_tiles(h, w, tile, self.overlap)
        if rgbx:
            out = np.empty((h * s, w * s, 4), dtype=np.uint8)[..., :3]  # X stays unset: encoders skip it
        else:
            out = np.empty((h * s, w * s, 3), dtype=np.uint8 if bits == 8 else np.uint16)
        # a view, no copy; torch warns about read-only arrays (np.asarray of a Pillow image), so
        # those are copied: the engine never writes to its input, but torch cannot be told so
        src = torch.from_numpy(rgb if rgb.flags.writeable else rgb.copy()).permute(2, 0, 1)
        cuda = self.device.type == "cuda"
        hi = 255.0 if bits == 8 else 65535.0
        qdtype = torch.uint8 if bits == 8 else torch.int32  # torch has no general uint16 arithmetic

        f = self.feather

        def finish(group: list[Tile], yq: torch.Tensor, ready) -> None:
            if ready is not None:
                ready.synchronize()
            ynp = yq.numpy()
            for t, yt in zip(group, ynp):
                # Each tile owns out_y0..out_y1 x out_x0..out_x1; with a feather it also reaches f
                # pixels past every edge it shares with a neighbour, and over the 2f pixels around
                # the seam with the neighbours written before it (above, left) it is blended in.
                y0, y1 = max(t.out_y0 - f, 0) if t.out_y0 else 0, min(t.out_y1 + f, h)
                x0, x1 = max(t.out_x0 - f, 0) if t.out_x0 else 0, min(t.out_x1 + f, w)
                part = yt[(y0 - t.in_y) * s : (y1 - t.in_y) * s, (x0 - t.in_x) * s : (x1 - t.in_x) * s]
                dst = out[y0 * s : y1 * s, x0 * s : x1 * s]
                if not f or (t.out_y0 == 0 and t.out_x0 == 0):
                    dst[...] = part
                    continue
                wy = _ramp((y1 - y0) * s, 2 * f * s if t.out_y0 else 0)
                wx = _ramp((x1 - x0) * s, 2 * f * s if t.out_x0 else 0)
                wgt = (wy[:, None] * wx[None, :])[..., None]
                dst[...] = (part * wgt + dst * (1 - wgt) + 0.5).astype(dst.dtype)

        pending = None
        for i in range(0, len(tiles), batch):
            group = tiles[i : i + batch]
            x = torch.stack([src[:, t.in_y : t.in_y + th, t.in_x : t.in_x + tw] for t in group])
            if cuda:
                x = x.pin_memory()  # lets the copy to the device run asynchronously
            y = self._run(x)
            # Quantize where the data is (fewer bytes to copy back), channels last like the output.
            yq = (y.float().clamp_(0, 1).mul_(hi).add_(0.5)).to(qdtype).permute(0, 2, 3, 1)
            ready = None
            if cuda:
                host = torch.empty(yq.shape, dtype=qdtype, pin_memory=True)
                host.copy_(yq, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.device))  # the model's GPU, which need not be the current one
                yq = host
            if pending is not None:
                finish(*pending)  # the previous batch is copied out while this one computes
            pending = (group, yq, ready)
            if progress:
                progress(min(i + batch, len(tiles)), len(tiles))
        if pending is not None:
            finish(*pending)
        return out

    def upscale_decoded(self, dec: Decoded, progress: Callable[[int, int], None] | None = None,
                        for_pillow: bool = False) -> Encoded:
        """for_pillow: the output goes to a Pillow encoder (JPEG, WebP); where that can read the
        engine's buffer in place (8-bit colour without alpha), it is laid out for that (rgbx)."""
        rgbx = for_pillow and dec.bits == 8 and not dec.gray and dec.alpha is None
        return assemble(dec, self.upscale_rgb(dec.rgb, dec.bits, progress, rgbx=rgbx))

    def batch_limit(self, size: tuple[int, int]) -> int:
        """How many images of `size` (W, H) one forward pass may take together: the tile batch
        when such an image is a single tile, else 1 (its tiles are batched instead)."""
        tile, batch = self.tile_and_batch()
        w, h = size
        return batch if max(w, h) <= tile + 2 * self.overlap else 1

    @torch.inference_mode()
    def upscale_decoded_many(self, decs: list[Decoded]) -> list[Encoded]:
        """Equal-size images upscaled in one forward pass each `batch_limit`: a GPU is far
        busier with 8 small photos at once than with 8 in turn. Results equal one-by-one ones up to
        float rounding (a batched convolution may round a last bit differently: a level, rarely)."""
        if len(decs) == 1 or len({(d.size, d.bits) for d in decs}) != 1 or self.batch_limit(decs[0].size) < len(decs):
            return [self.upscale_decoded(d) for d in decs]
        bits = decs[0].bits
        hi = 255.0 if bits == 8 else 65535.0
        arrays = [d.rgb for d in decs]
        if len({a.dtype for a in arrays}) > 1:  # never mix uint8 and float in one tensor
            arrays = [unit_float(a) for a in arrays]
        x = torch.stack([torch.from_numpy(a if a.flags.writeable else a.copy()).permute(2, 0, 1) for a in arrays])
        if self.device.type == "cuda":
            x = x.pin_memory()
        y = (self._run(x).float().clamp_(0, 1).mul_(hi).add_(0.5))
        y = y.to(torch.uint8 if bits == 8 else torch.int32).permute(0, 2, 3, 1).cpu().numpy()
        return [assemble(d, yi if bits == 8 else yi.astype(np.uint16)) for d, yi in zip(decs, y)]

    def warm_up(self) -> None:
        """One small forward so the first real image does not pay for lazy initialisation."""
        probe = np.full((32, 32, 3), 128, dtype=np.uint8)  # the common input type
        self.upscale_rgb(probe)

