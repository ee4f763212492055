"""The importable interface of benchmarks/pretrain_step.py (benchmarks/gpu_suite.py calls it on a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from test_trainer import TINY

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain_step.py"
SMALL = [o for o in TINY if not o.startswith(("data.", "log."))]


def _bench():
    spec = importlib.util.spec_from_file_location("pretrain_step_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_measure_step_and_loader_on_cpu():
    bench = _bench()
    bench.synthetic_tiles(96, n_per_class=2)  # a small folder, reused by both calls (cpu-tiny: 96 px tiles)
    step = bench.measure_step("cpu-tiny", 4, 16, "cpu", steps=2, warmup=1, overrides=SMALL)
    for key in ("step_ms", "bare_ms", "overhead", "augment_ms", "losses_centering_ms", "ema_ms",
                "step_images_per_s"):
        assert step[key] >= 0, key
    assert step["device"] == "cpu" and step["batch_size"] == 4 and step["patch_size"] == 16
    assert abs(step["overhead"] - step["step_ms"] / step["bare_ms"]) < 0.01
    loader = bench.measure_loader("cpu-tiny", 4, 0, "cpu", batches=2, patch_size=16, step=step,
                                  overrides=SMALL)
    assert loader["images_per_s"] > 0 and loader["step_images_per_s"] == step["step_images_per_s"]
    assert loader["workers_capacity_images_per_s"] == 0  # no worker processes
    assert loader["worker_cpu_ms_per_image"] > 0
