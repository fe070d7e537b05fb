"""Where the engine's tile batches run: PyTorch, or an exported graph in OpenVINO, ONNX Runtime or ncnn.

PyTorch runs every model: ours folded (model/fold.py), in bf16 where the CPU computes it
natively, and imported ones as spandrel builds them. Our generator can also run as an exported
graph, made at load from the fp32 FoldedGenerator, which is itself made from the safetensors
checkpoint: ONNX, made in memory, for OpenVINO and ONNX Runtime; ncnn's .param and .bin, written
layer by layer from the module's weights (model/ncnngraph.py). No graph is ever read from a file
someone else could have written, so no file can smuggle one in. Each runs that graph in fp32;
ncnn also with the body stored in bf16 (computed in fp32), which halves its memory traffic.
On a CPU without native bf16, OpenVINO is faster than PyTorch's oneDNN path with the bundled
model under an AVX2 cap. It is 4-35% faster on a quiet machine and 2-3x faster when other
processes compete for the cores: PyTorch's OpenMP (libgomp) threads spin at every barrier while
a preempted partner holds it up, and OpenVINO's TBB scheduler does not. ncnn computes the body's
3x3 convolutions with Winograd transforms, which need fewer multiplies than the others' direct
or GEMM convolutions; it shares PyTorch's libgomp, spinning included (docs/performance.md,
bench/benchmark.py row 6).

`inference.runtime: auto` picks by measuring. A short probe times every installed candidate on
one tile-sized input, interleaved, and keeps the fastest one whose output matches PyTorch fp32.
The choice is cached per model version, CPU, thread count, precision setting and package
versions. The cache is a JSON file written atomically, and it is only a hint: it names a runtime,
and that runtime's graph is still built from the checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from torch import nn

from core.atomic import atomic_write_text
from core.config import ConfigError
from model.fold import FoldedGenerator
from model.generator import Generator
from model.ncnngraph import ncnn_graph

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime", "ncnn")
EXPORTED = ("openvino", "onnxruntime", "ncnn")  # the runtimes that take our generator as an exported graph
# The form each takes it in, and the packages that needs: torch.onnx.export writes ONNX with onnx,
# which is not a dependency of torch.
GRAPH = {"openvino": "ONNX", "onnxruntime": "ONNX", "ncnn": "ncnn"}
NEEDS = {"openvino": ("openvino", "onnx"), "onnxruntime": ("onnxruntime", "onnx"), "ncnn": ("ncnn",)}
# The precisions each runs: fp32, and for ncnn also bf16 storage of the body (model/ncnngraph.py).
PRECISIONS = {"openvino": ("fp32",), "onnxruntime": ("fp32",), "ncnn": ("fp32", "bf16")}
# An exported graph's output may differ from PyTorch fp32 by rounding: 1e-6 measured (ncnn's
# Winograd convolutions: 1e-5 on the bundled model).
# Anything past 1e-3 (a quarter of an 8-bit level) means the graph is wrong.
TOLERANCE = 1e-3
# bf16 keeps 8 significant bits: on the probe's noise input the bundled model's output moved by
# up to 0.017 through ncnn bf16 (0.010 through PyTorch bf16), 0.002 on a photo. A wrong graph is
# off by far more; quality is what the benchmark measures (bench/benchmark.py row 6).
BF16_TOLERANCE = 0.05
PROBE_ROUNDS = 3
CACHE_FORMAT = 1


class Runtime:
    """One model, ready to run: N x 3 x H x W float32 in [0, 1] (CPU) -> N x 3 x sH x sW, unclamped."""

    name = "torch"
    precision = "fp32"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __str__(self) -> str:
        return f"{self.name} {self.precision}"


class TorchRuntime(Runtime):
    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.module = module
        self.precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))


class OpenVINORuntime(Runtime):
    name = "openvino"

    def __init__(self, graph: bytes, threads: int, precision: str = "fp32"):
        import openvino as ov

        model = ov.convert_model(io.BytesIO(graph))
        # f32 on every CPU: OpenVINO's bf16 would round the ends that touch pixels too (see
        # model/fold.py), and LATENCY with one stream runs one batch on all threads, like torch.
        self.compiled = ov.Core().compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.request.infer({0: x.float().contiguous().numpy()}, share_inputs=True, share_outputs=False)[0]
        return torch.from_numpy(y)


class OnnxRuntimeRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, graph: bytes, threads: int, precision: str = "fp32"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # its warnings about unused initializers are noise here
        self.session = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"x": x.float().contiguous().numpy()})[0])


class NcnnRuntime(Runtime):
    """ncnn takes one image at a time: the tiles of a batch run in turn, each on all threads."""

    name = "ncnn"

    def __init__(self, graphs: dict[str, tuple[str, bytes]], threads: int, precision: str = "fp32"):
        import ncnn

        self._mat = ncnn.Mat
        self.precision = precision
        param, weights = graphs[precision]
        self.net = ncnn.Net()
        opt = self.net.opt
        opt.use_vulkan_compute = False
        opt.num_threads = threads
        # fp32 storage and arithmetic: ncnn's default stores in fp16 where the CPU has it.
        opt.use_fp16_storage = opt.use_fp16_packed = opt.use_fp16_arithmetic = False
        opt.use_int8_inference = False
        # bf16: the body's activations and weights stored in bf16 (computed in fp32), the ends in
        # fp32 (model/ncnngraph.py); on a CPU without native bf16 too, as it halves memory traffic.
        opt.use_bf16_storage = opt.use_bf16_packed = precision == "bf16"
        # Blobs and scratch from pools that live as long as the net: an extractor of its own
        # allocates every blob afresh, paging tens of MB in per tile (measured: 3 % of the time).
        self._blobs, self._work = ncnn.PoolAllocator(), ncnn.PoolAllocator()
        opt.blob_allocator, opt.workspace_allocator = self._blobs, self._work
        if self.net.load_param_mem(param):
            raise RuntimeError("ncnn did not accept the generator's graph")
        # The Python binding loads weights from a file only (its in-memory load takes a str): a
        # private folder (mode 0700), removed once they are read.
        with tempfile.TemporaryDirectory(prefix="upscaled-ncnn-") as folder:
            path = Path(folder) / "generator.bin"
            path.write_bytes(weights)
            if self.net.load_model(str(path)):
                raise RuntimeError("ncnn did not accept the generator's weights")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for xi in x.float().contiguous().numpy():
            ex = self.net.create_extractor()
            # clone(): a Mat that owns its memory. ncnn works in place on the input blob, which on a
            # Mat that only wraps numpy's memory crashed (segfault, ncnn 1.0.20261020).
            ex.input("in", self._mat(np.ascontiguousarray(xi)).clone())
            rc, y = ex.extract("out")
            if rc:
                raise RuntimeError(f"ncnn extraction failed ({rc})")
            outs.append(torch.from_numpy(np.array(y, copy=True)))  # the Mat's memory goes with the extractor
        return outs[0][None] if len(outs) == 1 else torch.stack(outs)


BUILDERS = {"openvino": OpenVINORuntime, "onnxruntime": OnnxRuntimeRuntime, "ncnn": NcnnRuntime}


def installed(name: str) -> bool:
    """Whether runtime `name` can serve here: its own package, and for ONNX also onnx (NEEDS)."""
    return all(importlib.util.find_spec(n) is not None for n in NEEDS.get(name, (name,)))


def missing(name: str) -> str:
    return ", ".join(n for n in NEEDS.get(name, (name,)) if importlib.util.find_spec(n) is None)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def export_graph(folded: nn.Module) -> bytes:
    """The fp32 FoldedGenerator as an ONNX graph, in memory: batch, height and width stay free."""
    sample = torch.rand(1, 3, 32, 32)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(folded.float().eval(), (sample,), buf, input_names=["x"], output_names=["y"], opset_version=17,
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "sh", 3: "sw"}}, dynamo=False)
    return buf.getvalue()


def export(folded: nn.Module, kind: str, precisions: tuple[str, ...] = ("fp32", "bf16")):
    """The fp32 FoldedGenerator in the form `kind` (a GRAPH value) that its runtimes build from;
    for ncnn one graph per precision asked for."""
    if kind == "ONNX":
        return export_graph(folded)
    return {p: ncnn_graph(folded, bf16=p == "bf16") for p in precisions}


def cpu_identity() -> str:
    """The CPU as the probe result depends on it: model name and the vector/matrix ISA flags."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return f"{name} [{' '.join(isa)}]"


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "upscaled" / "runtimes.json"


@dataclass(frozen=True)
class ProbeCache:
    """The probe's choices, keyed by what they depend on; only ever a hint (see the module docstring)."""

    path: Path

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("runtime probe cache {} unreadable ({}); probing again", self.path, e)
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("choices"), dict):
            return {}
        return data["choices"]

    def get(self, key: str) -> dict | None:
        hit = self._read().get(key)
        return hit if isinstance(hit, dict) and hit.get("runtime") in RUNTIMES[1:] else None

    def put(self, key: str, choice: dict) -> None:
        choices = self._read()
        choices[key] = choice
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"format": CACHE_FORMAT, "choices": choices}, indent=1, sort_keys=True))
        except OSError as e:  # a read-only home only costs the probe at the next start
            logger.warning("runtime probe cache {} not written: {}", self.path, e)


def cache_key(version: str, precision: str, threads: int) -> str:
    packages = " ".join(f"{p} {_version(p)}" for p in ("torch", *EXPORTED))
    return f"{version} | {precision} | {threads} threads | {cpu_identity()} | {packages}"


def _time(run: Runtime, x: torch.Tensor) -> float:
    t = time.perf_counter()
    run(x)
    return time.perf_counter() - t


def label(name: str, precision: str) -> str:
    """How the probe names a candidate: the runtime, and its precision where that is not fp32."""
    return name if name == "torch" or precision == "fp32" else f"{name} {precision}"


def probe(candidates: dict[str, Runtime], reference: torch.Tensor, x: torch.Tensor) -> tuple[str, dict[str, float]]:
    """The fastest candidate whose output matches `reference` (PyTorch fp32 on x), and each one's
    best time in seconds per output MP. Rounds are interleaved, so a swing in the speed of a shared
    machine hits every candidate alike; the best of each is the least disturbed."""
    times: dict[str, list[float]] = {}
    for name, run in candidates.items():
        if name != "torch":  # torch is the reference itself (or its bf16 path, guarded by the benchmark)
            diff = (run(x).float() - reference).abs().max().item()
            limit = TOLERANCE if run.precision == "fp32" else BF16_TOLERANCE
            if not diff <= limit:
                logger.warning("runtime {} differs from PyTorch fp32 by {:.2g} (limit {}); not used", name, diff, limit)
                continue
        else:
            run(x)  # lazy initialisation
        times[name] = []
    out_mp = reference.shape[-1] * reference.shape[-2] * reference.shape[0] / 1e6
    for _ in range(PROBE_ROUNDS):
        for name in times:
            times[name].append(_time(candidates[name], x))
    best = {name: min(t) / out_mp for name, t in times.items()}
    return min(best, key=best.get), best


def select_runtime(torch_module: nn.Module, dtype: torch.dtype, generator: nn.Module, device: torch.device,
                   version: str | None, requested: str = "auto", threads: int = 0, probe_side: int = 64,
                   cache: ProbeCache | None = None, precision_auto: bool = True) -> Runtime:
    """The runtime that serves `generator` (see the module docstring).

    torch_module is what PyTorch runs (the engine's folded or imported model, in `dtype`);
    probe_side is the probe input's side in low-resolution pixels (a tile with its context).
    An exported graph runs fp32, ncnn's also bf16 (PRECISIONS). With a precision set explicitly
    (not auto) only the candidates that run it compete; with auto, every one of them.
    Raises ValueError for a runtime that cannot serve as configured, and ConfigError (naming
    inference.runtime) when its package is missing or the export or build fails.
    """
    if requested not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {requested!r}")
    torch_rt = TorchRuntime(torch_module, dtype)
    ours = isinstance(generator, Generator) and device.type == "cpu"
    if requested == "torch" or not ours:
        if requested in EXPORTED:
            why = "an imported model" if not isinstance(generator, Generator) else f"the device is {device}"
            logger.info("inference.runtime {} cannot take this model ({}); PyTorch serves it", requested, why)
        return torch_rt
    threads = threads or torch.get_num_threads()
    if requested in EXPORTED:
        if not installed(requested):
            raise ConfigError("inference.runtime", f"auto or torch: {missing(requested)} is not installed here "
                              "(pip install 'upscaled[runtimes]')", requested)
        want = "fp32" if precision_auto else torch_rt.precision
        if want not in PRECISIONS[requested]:
            raise ValueError(f"inference.runtime {requested} runs {' or '.join(PRECISIONS[requested])}; set "
                             f"inference.precision to {', '.join(PRECISIONS[requested])} or auto")
        kind = GRAPH[requested]
        try:
            graph = export(FoldedGenerator(generator, torch.float32), kind, (want,))
        except Exception as e:  # noqa: BLE001 - said as a configuration problem, not a traceback
            raise ConfigError("inference.runtime", f"auto or torch: the {kind} export failed here ({type(e).__name__}: {e})",
                              requested) from e
        return BUILDERS[requested](graph, threads, want)
    allowed = ("fp32", "bf16") if precision_auto else (torch_rt.precision,)
    variants = [(n, p) for n in EXPORTED if installed(n) for p in PRECISIONS[n] if p in allowed]
    names = [n for n in EXPORTED if any(v[0] == n for v in variants)]
    if not variants:
        return torch_rt
    key = cache_key(version, "auto" if precision_auto else torch_rt.precision, threads) \
        if version and version != "untracked" else None
    hit = cache.get(key) if cache and key else None
    if hit and (hit["runtime"] == "torch" or (hit["runtime"], hit.get("precision")) in variants):
        logger.info("runtime {} {} (probe result cached in {})", hit["runtime"], hit.get("precision"), cache.path)
        if hit["runtime"] == "torch":
            return torch_rt
        try:
            graph = export(FoldedGenerator(generator, torch.float32), GRAPH[hit["runtime"]], (hit["precision"],))
            return BUILDERS[hit["runtime"]](graph, threads, hit["precision"])
        except Exception as e:  # noqa: BLE001 - the cache is a hint; a failed build costs a probe, never the start
            logger.warning("cached runtime {} cannot build ({}: {}); probing again", hit["runtime"], type(e).__name__, e)
    t0 = time.perf_counter()
    folded = FoldedGenerator(generator, torch.float32)
    graphs: dict[str, object] = {}
    candidates: dict[str, Runtime] = {"torch": torch_rt}
    for n, p in variants:
        kind = GRAPH[n]
        if kind not in graphs:
            try:
                graphs[kind] = export(folded, kind, tuple(q for m, q in variants if GRAPH[m] == kind))
            except Exception as e:  # noqa: BLE001 - auto never fails where PyTorch alone would serve
                logger.warning("runtime probe: the {} export failed ({}: {}); {} not used", kind, type(e).__name__, e,
                               ", ".join(m for m in names if GRAPH[m] == kind))
                graphs[kind] = None
        if graphs[kind] is None:
            continue
        try:
            candidates[label(n, p)] = BUILDERS[n](graphs[kind], threads, p)
        except Exception as e:  # noqa: BLE001 - a runtime that cannot build is not a candidate
            logger.warning("runtime {} {} cannot build the graph ({}: {}); not used", n, p, type(e).__name__, e)
    if len(candidates) == 1:
        logger.warning("runtime probe skipped: no other runtime could be built; PyTorch serves")
        return torch_rt
    x = torch.rand(1, 3, probe_side, probe_side, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = folded(x)
        best, rates = probe(candidates, reference, x)
    logger.info("runtime probe ({:.1f} s): {}; {} serves", time.perf_counter() - t0,
                ", ".join(f"{candidates[n]} {r:.3f} s/MP" for n, r in rates.items()), candidates[best])
    if cache and key:
        cache.put(key, {"runtime": candidates[best].name, "precision": candidates[best].precision,
                        "seconds_per_mp": {n: round(r, 4) for n, r in rates.items()},
                        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return candidates[best]
