"""The benchmark's table renders on every kind of machine, including one without native bf16,
where the bf16 peak is not measured (it would take minutes of emulated matmuls)."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("benchmark", Path(__file__).parents[1] / "bench" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)

GEN_ROW = {"model": "served 8x32 (59 GFLOP/MP)", "path": "engine fp32", "s_per_mp": 0.5, "mp_per_s": 2.0, "gflops": 118.0}


def result(**extra) -> dict:
    return {"date": "2026-12-01", "device": "cpu", "cpu": "x86_64", "threads": 2, "native_bf16": False, "quick": True,
            "model": "m", "fp32_peaks": {"matmul": 134.0, "conv1x1": 155.0}, "fp32_peak_gflops": 155.0,
            "generator": [GEN_ROW], **extra}


def test_table_without_a_bf16_peak_says_so() -> None:
    text = benchmark.table(result())
    assert "bf16 not measured (no native bf16" in text
    assert "| 118 | 76% | n/a (emulated bf16) |" in text


def test_table_with_a_bf16_peak_gives_its_share() -> None:
    text = benchmark.table(result(native_bf16=True, bf16_peaks={"matmul": 900.0, "conv1x1": 943.0}, bf16_peak_gflops=943.0))
    assert "bf16 900 | 943" in text and "| 118 | 76% | 13% |" in text
