"""The benchmark's table renders on every kind of machine, including one without native bf16,
where the bf16 peak is not measured (it would take minutes of emulated matmuls)."""
import importlib.util
import os
import threading
import time
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


def test_thread_cpu_sums_cpu_seconds_by_kernel_thread_name() -> None:
    from daemon.worker import name_os_thread

    def burn() -> None:
        name_os_thread("bench-burner")
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        done.wait()

    done = threading.Event()
    t = threading.Thread(target=burn)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while benchmark.thread_cpu(os.getpid()).get("bench-burner", 0.0) < 0.25:
            assert time.monotonic() < deadline, benchmark.thread_cpu(os.getpid())
            time.sleep(0.05)
    finally:
        done.set()
        t.join()


def test_table_gives_the_daemon_cpu_by_thread() -> None:
    daemon = {"images": "10 x 256x256 + 1 x 1024x768", "content": "synthetic", "out_mp": 23.0, "bare_s": 10.0,
              "daemon_s": 10.5, "ratio": 10 / 10.5, "rounds": 2, "round_ratios": [0.93, 0.975], "bare_cpu_s": 19.9,
              "daemon_cpu_s": 20.6, "daemon_cpu_by_thread": {"inference": 19.8, "io": 0.7, "python": 0.1, "watchdog": 0.01},
              "others_cpu_s": {"bare": 0.2, "daemon": 0.3}, "steal_s": {"bare": 0.0, "daemon": 1.5},
              "latency_ms": 60.0, "latencies_ms": [58.0, 60.0, 75.2], "model_ms": 30.0, "overhead_ms": 30.0}
    text = benchmark.table(result(daemon=daemon))
    assert "in 2 alternating round(s)" in text and "throughput ratio 0.952 (goal >= 0.9); rounds 0.930-0.975" in text
    assert "daemon 20.6 (inference 19.8, io 0.7, python 0.1)" in text  # below 0.05 s is left out
    assert "steal 0.0 / 1.5 (bare / daemon)" in text
    assert "60 ms arrival-to-output (median of 3: 58-75 ms), model 30 ms, overhead 30 ms" in text


def test_runtime_table_gives_each_runtime_its_ratio_to_span_and_marks_auto() -> None:
    rt = {"cpu": {"model": "AMD EPYC", "flags": ["avx2", "fma"], "caps": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}, "model": "m",
          "auto": "openvino fp32", "auto_probe_s": 11.8, "side": 768, "span_isa": "ncnn",
          "isa": {"torch fp32": "oneDNN capped at AVX2", "openvino fp32": "brgconv_avx2_f32"},
          "sets": {"photos": {"images": 10, "out_mp": 5.0, "s_per_mp": {"torch fp32": 2.0, "openvino fp32": 0.5, "SPAN": 1.0},
                              "psnr_y": {"torch fp32": 34.4, "openvino fp32": 34.39, "SPAN": 35.4}}}}
    text = benchmark.table(result(runtimes=rt))
    assert "caps: ONEDNN_MAX_CPU_ISA=AVX2" in text and "auto picks openvino fp32" in text
    assert "| photos (10 images, 5.0 MP) | openvino (auto) | fp32 | 0.500 | 0.50 | 34.390 | -0.0100 |" in text
    assert "| torch | fp32 | 2.000 | 2.00 |" in text and "| SPAN | ncnn default | 1.000 | 1.00 | 35.400 | - |" in text
