"""benchmarks/tiles_throughput.py runs end to end on a tiny synthetic slide and reports every column
(no timing assertions: the default suite runs on loaded machines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KINDS = ("raw", "tilereader", "pipeline", "slide_read")


def test_tiles_throughput_reports_tilereader_pipeline_and_slide_read(tmp_path):
    out = tmp_path / "tiles.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "tiles_throughput.py"), "--sizes", "1024",
           "--mpp", "0.25", "0.5", "8", "--tile-size", "128", "--tiles", "12", "--slides", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads(out.read_text())
    (slide,) = results["slides"]
    assert slide["dimensions"] == [1024, 1024]
    # 8 µm/px: a 128 px tile spans 4,096 level-0 px, more than the slide, so `tiles` refuses that target
    assert [t["mpp"] for t in slide["targets"]] == [0.25, 0.5]
    for t in slide["targets"]:
        assert 5 <= t["tiles"] <= 12
        for k in KINDS:
            assert t[f"{k}_tiles_per_s"] > 0, k
        for k in KINDS[1:]:
            assert t[f"{k}_vs_raw"] > 0, k
    assert results["peak_memory_mib"]["1024"] > 0  # `tile_slide` ran in its own process
    assert "tilereader/raw" in res.stdout and "slide_read/raw" in res.stdout
