"""benchmarks/gpu_suite.py starts on a bare GPU machine: PyTorch and timm only, no slide readers,
no webdataset. Checked by running its ``--quick --device cpu`` mode with those modules blocked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from openpluto.model import build_model
from openpluto.model.flops import model_forward_flops

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("openslide", "tiffslide", "imagecodecs", "webdataset", "braceexpand", "wids")


def _blocked_python(body: str) -> list[str]:
    """``python -c`` that makes every import of a BLOCKED module fail, then runs ``body``."""
    return [sys.executable, "-c", f"import sys\nfor m in {BLOCKED!r}:\n    sys.modules[m] = None\n{body}"]


def test_model_ssl_and_train_import_without_slide_or_shard_libraries():
    mods = ["openpluto.model", "openpluto.ssl", "openpluto.train.trainer", "openpluto.train.data"]
    r = subprocess.run(_blocked_python("\n".join(f"import {m}" for m in mods)), cwd=REPO,
                       capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]


def test_gpu_suite_quick_runs_on_a_bare_machine(tmp_path):
    argv = ["benchmarks/gpu_suite.py", "--quick", "--device", "cpu", "--out", str(tmp_path)]
    body = f"import runpy\nsys.argv = {argv!r}\nrunpy.run_path({argv[0]!r}, run_name='__main__')"
    r = subprocess.run(_blocked_python(body), cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    table = (tmp_path / "gpu_suite.md").read_text()
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [p["section"] for p in result["parts"]] == ["numerics", "vits", "vitg", "ssl", "loader"]
    assert not [p for p in result["parts"] if p.get("error")]
    numerics = result["parts"][0]["rows"]
    assert len(numerics) == 3 and all(r["ok"] for r in numerics), numerics
    vits = [r for p in result["parts"] if p["section"] == "vits" for r in p["rows"]]
    modes = {(m, p) for m in ("fwd", "fwd+bwd") for p in (8, 16, 32)}
    assert {(r["mode"], r["patch"]) for r in vits} == modes
    assert {r["ref"] for r in vits} == {"timm ViT-S reg4 (learned pos)", "timm ViT-S RoPE (dinov3)"}
    assert all(r["ratio"] > 0 for r in vits)
    assert "PLUTO-4G fwd+bwd, attention cudnn" in table and "SSL step" in table and "loader" in table
    # the table can be rebuilt from the parts alone
    rebuilt = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--out", str(tmp_path), "--table"],
                             cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)})
    assert rebuilt.returncode == 0 and rebuilt.stdout == table


def test_analytic_flops_agree_with_torch_flop_counter():
    """The FLOPs behind '% of peak' (counter: matmuls and convolutions; SDPA is not always counted)."""
    cases = (("vit_micro_flexi", {}, 64, 8), ("pluto4g", {"depth": 2, "img_size": 112}, 112, 14))
    for name, over, img, p in cases:
        model = build_model(name, **over).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.forward_features(torch.randn(2, 3, img, img), p)
        counted, analytic = fc.get_total_flops() / 2, model_forward_flops(model.cfg, img, p)
        assert 0.9 < counted / analytic <= 1.0, (name, counted, analytic)
