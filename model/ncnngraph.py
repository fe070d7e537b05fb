"""The fp32 FoldedGenerator written as an ncnn graph (.param text and .bin weights), layer by layer.

The folded generator is a short list of operations ncnn has as layers: convolutions, per-channel
PReLU, adds, PixelShuffle and, for a skip, a bilinear or bicubic resize of the input. Writing
them directly from the module's own weights needs no converter and reads no graph from a file.
ncnn blobs are single-consumer, so a blob read twice goes through a Split.

With bf16 (bf16 storage on in NcnnRuntime: activations and weights stored in bf16, computed in
fp32), the layers that touch pixels (the input's centring, the 9x9 head, the tail conv, the
shuffle and the skip) are marked fp32-only, as model/fold.py keeps them in fp32, so only the
body is rounded. ncnn's per-layer mask (featmask, param 31) also turns off the conversion of
a layer's input (ncnn 1.0.20261020): a masked layer fed a bf16 blob reads it as fp32 and corrupts
the heap. So the body's last output goes through an explicit Cast to fp32 before the tail, and
the input stays fp32 through masked Splits.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
from torch import nn

from model.fold import FoldedGenerator

MAGIC = 7767517
RESIZE = {"bilinear": 2, "bicubic": 3}  # ncnn Interp resize_type
ADD, SUB = 0, 1  # ncnn BinaryOp op_type
FP32_ONLY = " 31=4"  # featmask bit 2: this layer never uses bf16 storage


class _Writer:
    def __init__(self) -> None:
        self.layers: list[str] = []
        self.blobs = 1  # "in" and the numbered ones
        self.weights: list[bytes] = []
        self.exact = False  # while set (and bf16), every layer written is fp32-only
        self.bf16 = False

    def blob(self) -> str:
        self.blobs += 1
        return f"b{self.blobs}"

    def layer(self, kind: str, inputs: list[str], outputs: int = 1, params: str = "", name: str = "") -> list[str]:
        outs = [name or self.blob() for _ in range(outputs)]
        name = f"{kind.lower()}{len(self.layers)}"
        params += FP32_ONLY if self.exact and self.bf16 else ""
        self.layers.append(f"{kind:<16} {name:<16} {len(inputs)} {len(outs)} {' '.join(inputs + outs)} {params}".rstrip())
        return outs

    def split(self, x: str, n: int = 2) -> list[str]:
        return self.layer("Split", [x], n)

    def conv(self, x: str, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> str:
        out_ch, in_ch, kh, kw = weight.shape
        # a leading 4-byte zero tag marks raw fp32 weights; the bias is read untagged
        self.weights += [struct.pack("<I", 0), _f32(weight), _f32(bias)]
        return self.layer("Convolution", [x], 1, f"0={out_ch} 1={kw} 11={kh} 4={padding} 14={padding} 5=1 6={weight.numel()}")[0]

    def prelu(self, x: str, slope: torch.Tensor) -> str:
        self.weights.append(_f32(slope))
        return self.layer("PReLU", [x], 1, f"0={slope.numel()}")[0]

    def binary(self, a: str, b: str | float, op: int, name: str = "") -> str:
        if isinstance(b, str):
            return self.layer("BinaryOp", [a, b], 1, f"0={op}", name)[0]
        return self.layer("BinaryOp", [a], 1, f"0={op} 1=1 2={b:.9g}", name)[0]

    def text(self) -> str:
        return "\n".join([str(MAGIC), f"{len(self.layers)} {self.blobs}", *self.layers]) + "\n"


def _f32(t: torch.Tensor) -> bytes:
    return np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype="<f4").tobytes()


def _conv(w: _Writer, x: str, conv: nn.Conv2d) -> str:
    assert conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding[0] == conv.padding[1]
    return w.conv(x, conv.weight, conv.bias, conv.padding[0])


def ncnn_graph(folded: FoldedGenerator, bf16: bool = False) -> tuple[str, bytes]:
    """(param text, weights) of `folded` (fp32) as ncnn runs it: input blob "in", output "out",
    both C x H x W; height and width stay free. bf16: for a net with bf16 storage (see above)."""
    assert folded.dtype == torch.float32
    cfg = folded.cfg
    w = _Writer()
    w.bf16 = bf16
    w.layers.append(f"{'Input':<16} {'input':<16} 0 1 in")
    w.exact = True
    x, x_skip = w.split("in") if cfg.skip != "none" else ("in", None)
    h = w.binary(x, 0.5, SUB)
    h = w.prelu(_conv(w, h, folded.head[0]), folded.head[1].weight)
    w.exact = False
    h, h_skip = w.split(h)
    for block in folded.body:
        h, res = w.split(h)
        t = w.prelu(_conv(w, h, block.conv1), block.act.weight)
        h = w.binary(res, _conv(w, t, block.conv2), ADD)
    h = w.binary(h_skip, _conv(w, h, folded.body_tail[0]), ADD)
    for up in folded.upsample:  # the stages before the last: conv, PixelShuffle(2), PReLU
        h = w.prelu(w.layer("PixelShuffle", [_conv(w, h, up.conv)], 1, "0=2")[0], up.act.weight)
    if isinstance(folded.last_conv, nn.Conv2d):
        h = w.prelu(_conv(w, h, folded.last_conv), folded.last_slope)
    w.exact = True
    if bf16:
        h = w.layer("Cast", [h], 1, "0=4 1=1")[0]  # bf16 -> fp32
    y = w.conv(h, folded.tail_weight, folded.tail_bias, folded.tail_padding[0])
    y = w.layer("PixelShuffle", [y], 1, f"0={folded.shuffle}")[0]
    if x_skip is None:
        w.binary(y, 0.5, ADD, name="out")
    else:  # ncnn's Interp samples as F.interpolate(align_corners=False) does, bicubic's A = -0.75 too
        up = w.layer("Interp", [x_skip], 1, f"0={RESIZE[cfg.skip]} 1={float(cfg.scale)} 2={float(cfg.scale)}")[0]
        w.binary(y, up, ADD, name="out")
    w.blobs += 1
    return w.text(), b"".join(w.weights)
