"""One GPU check of issue 11: openpluto's backbones and pretraining step against timm, in one run.

    PYTHONPATH=. python benchmarks/gpu_suite.py --out /tmp/suite              # all sections, eager
    PYTHONPATH=. python benchmarks/gpu_suite.py --out OUT --only vits --compile  # one section, compiled
    PYTHONPATH=. python benchmarks/gpu_suite.py --out OUT --table              # merge OUT/parts/*.json
    PYTHONPATH=. python benchmarks/gpu_suite.py --out OUT --quick --device cpu # tiny models: start-up check
    bash benchmarks/gpu_check.sh OUT                                           # everything, timed (< 6 min)

Sections (each writes ``OUT/parts/<section>[-compiled].json`` row by row; the table merges them):

- ``numerics``: the fused RoPE kernel against the reference in bf16, PLUTO-4S in bf16 on the GPU against
  fp32 on the CPU, the cached PI-resized patch kernel against a fresh one;
- ``vits``: PLUTO-4S forward and forward+backward at patch 8/16/32 (batch 256, 224 px, bf16 autocast)
  against timm's learned-position ViT-S with 4 registers and timm's RoPE ViT-S
  (``vit_small_patch16_dinov3``, random init), the three alternating iteration by iteration;
- ``vitg``: PLUTO-4G (ViT-G/14) forward+backward (batch 32) against timm's ViT-G/14 with 4 registers,
  and as % of the dense bf16 peak (``--peak-tflops``; FLOPs counted analytically by
  ``openpluto.model.flops``, backward = 2x forward), with PyTorch's SDPA choice and cuDNN attention first;
- ``ssl``: the ``pluto4s`` SSL step at batch 64, patch 16, and its overhead over the bare backbone
  passes (``measure_step`` of benchmarks/pretrain_step.py);
- ``loader``: loader images/s (8 workers) against what the patch-32 step consumes (``measure_loader``).

``--compile`` compiles openpluto's blocks (``openpluto.model.maybe_compile``, what ``--compile`` does in
pretrain/embed/eval) and also compares compiled with eager outputs; timm stays eager unless
``--compile-timm``. Warm-up iterations absorb the compilation; rows report the graphs compiled in
warm-up and after it (must be 0).

Needs PyTorch and timm only: no slide reader, no webdataset, nothing downloaded (timm models are
built with random weights). Results: ``OUT/gpu_suite.json`` and ``OUT/gpu_suite.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

SECTIONS = ("numerics", "vits", "vitg", "ssl", "loader")
TARGETS = {"vits fwd": ">= 0.90x", "vits fwd+bwd": ">= 0.85x", "vitg fwd+bwd": ">= 1.00x, >= 50% of peak",
           "ssl": "<= 1.15x", "loader": ">= 1.5x"}


# ----------------------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, iters: int
              ) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps alternating (order rotated every iteration) so that
    all see the same machine state; ``warmup`` untimed rounds first (compilation happens there)."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + iters):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            _sync(device)
            t = time.perf_counter()
            steps[n]()
            _sync(device)
            if i >= warmup:
                times[n].append(time.perf_counter() - t)
    return times


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _step(model, x, patch: int | None, backward: bool, device: torch.device) -> Callable[[], None]:
    """One forward (no grad) or forward+backward of ``model`` on ``x`` under bf16 autocast on CUDA."""

    def run() -> None:
        model.train(backward)
        with _autocast(device):
            if not backward:
                with torch.no_grad():
                    model.forward_features(x, patch) if patch else model.forward_features(x)
                return
            model.zero_grad(set_to_none=True)
            out = model.forward_features(x, patch)["patch"] if patch else model.forward_features(x)
            out.float().square().mean().backward()

    return run


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _timed(steps: dict[str, Callable[[], None]], device: torch.device, sz: dict) -> tuple[dict, dict]:
    """(times per step after warm-up, graph counts compiled in and after warm-up)."""
    g0 = _graphs()
    alternate(steps, device, sz["warmup"], 0)
    g1 = _graphs()
    times = alternate(steps, device, 0, sz["iters"])
    return times, {"graphs_in_warmup": g1 - g0, "graphs_after_warmup": _graphs() - g1}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- models

def _sizes(quick: bool) -> dict:
    """Batch sizes, image size, iterations and model shrinking for the real run and for ``--quick``."""
    if quick:
        return {"img": 64, "s_batch": 2, "g_batch": 2, "g_img": 56, "warmup": 1, "iters": 1,
                "s_over": {"depth": 1, "embed_dim": 32, "num_heads": 2},
                "g_over": {"depth": 1, "embed_dim": 48, "num_heads": 2},
                "ssl": ("cpu-tiny", 4, 1), "loader": ("cpu-tiny", 4, 0, 2)}
    return {"img": 224, "s_batch": 256, "g_batch": 32, "g_img": 224, "warmup": 3, "iters": 10,
            "s_over": {}, "g_over": {}, "ssl": ("pluto4s", 64, 10), "loader": ("pluto4s", 64, 8, 20)}


def _dims(over: dict) -> dict:
    return {k: over[k] for k in ("depth", "embed_dim", "num_heads") if k in over}


def _timm_vits(kind: str, patch: int, img: int, over: dict, device: torch.device):
    import timm

    if kind == "learned":  # timm's stock ViT-S with 4 registers (same token count as PLUTO-4S)
        name, kw = "vit_small_patch16_224", {"reg_tokens": 4}
    else:  # timm's RoPE ViT-S (DINOv3 layout: 4 registers, LayerScale, 2D RoPE)
        name, kw = "vit_small_patch16_dinov3", {}
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=img, patch_size=patch,
                             **kw, **_dims(over)).to(device)


def _timm_vitg(img: int, over: dict, device: torch.device):
    import timm

    with device:
        return timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                                 img_size=img, **_dims(over))


def _ratio_row(check: str, ours: list[float], ref: list[float], batch: int, flops: float, mult: int,
               peak_tflops: float | None, ref_name: str) -> dict:
    o, r = batch / statistics.median(ours), batch / statistics.median(ref)
    row = {"check": check, "ours_img_s": round(o, 1), "ref": ref_name, "ref_img_s": round(r, 1),
           "ratio": round(o / r, 3), "ours_tflop_s": round(o * flops * mult / 1e12, 2)}
    if peak_tflops:
        row["ours_pct_peak"] = round(100 * row["ours_tflop_s"] / peak_tflops, 1)
        row["ref_pct_peak"] = round(100 * r * flops * mult / 1e12 / peak_tflops, 1)
    return row


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine similarity between matching token vectors of ``a`` and ``b``."""
    return float(F.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1).min())


def _check(check: str, value: float, ok: bool, limit: str) -> dict:
    return {"section": "numerics", "check": check, "value": round(value, 6), "ok": bool(ok), "limit": limit}


# ----------------------------------------------------------------------------------------- sections

def run_numerics(args, device: torch.device, sz: dict, tag: str) -> Iterator[dict]:
    from openpluto.model import build_model
    from openpluto.model.encoder import PlutoEncoder
    from openpluto.model.layers import apply_rope, rope_qk

    torch.manual_seed(0)
    model = build_model("pluto4s", **sz["s_over"]).eval()
    grid = (sz["img"] // 14, sz["img"] // 14)
    table = model.rope_table(grid, torch.device("cpu"))
    qkv = torch.randn(8, table.shape[1], 3, model.cfg.num_heads, model.cfg.head_dim).to(torch.bfloat16)
    ref = apply_rope(qkv.float().permute(2, 0, 3, 1, 4)[:2], table).to(torch.bfloat16).float()
    got = rope_qk(qkv.to(device)[:, :, :2], table.to(device)).permute(2, 0, 3, 1, 4).float().cpu()
    rel = float((got - ref).abs().max() / ref.abs().max())
    yield _check(f"fused RoPE ({'compiled kernel' if device.type == 'cuda' else 'eager'}) vs reference, "
                 "bf16, max abs diff / max abs ref", rel, rel <= 8e-3, "<= 8e-3 (1 bf16 ulp)")

    x = torch.randn(4, 3, sz["img"], sz["img"])
    with torch.no_grad():
        want = model.forward_features(x, 16)["patch"]
        gpu = copy.deepcopy(model).to(device)
        with _autocast(device):
            got = gpu.forward_features(x.to(device), 16)["patch"].float().cpu()
    cos = _cosine(got, want)
    precision = "bf16" if device.type == "cuda" else "fp32"
    yield _check(f"PLUTO-4S forward on {device.type} ({precision}) vs fp32 CPU, min token cosine",
                 cos, cos >= 0.99, ">= 0.99")

    enc = PlutoEncoder(gpu, "pluto4s", "random-init")
    with torch.no_grad():
        enc.embed(x[:2].to(device), 16)
        cached = gpu.patch_embed.kernel(16)
        fresh = gpu.patch_embed._resize(gpu.patch_embed.proj.weight, 16)
    diff = float((cached - fresh).abs().max())
    yield _check("cached PI-resized patch kernel vs fresh, max abs diff", diff, diff == 0.0, "== 0")


def run_vits(args, device: torch.device, sz: dict, tag: str) -> Iterator[dict]:
    from openpluto.model import build_model, maybe_compile
    from openpluto.model.flops import model_forward_flops

    torch.manual_seed(0)
    ours = build_model("pluto4s", img_size=sz["img"], **sz["s_over"]).to(device)
    eager = copy.deepcopy(ours) if args.compile else None
    maybe_compile(ours, args.compile)
    peak = args.peak_tflops if device.type == "cuda" else None
    for p in (8, 16, 32):
        refs = {"timm ViT-S reg4 (learned pos)": _timm_vits("learned", p, sz["img"], sz["s_over"], device),
                "timm ViT-S RoPE (dinov3)": _timm_vits("rope", p, sz["img"], sz["s_over"], device)}
        for ref in refs.values():
            maybe_compile(ref, args.compile_timm)
        x = torch.randn(sz["s_batch"], 3, sz["img"], sz["img"], device=device)
        flops = model_forward_flops(ours.cfg, sz["img"], p)
        for mode in args.modes:
            bwd = mode == "fwd+bwd"
            steps = {"ours": _step(ours, x, p, bwd, device)}
            steps.update({n: _step(m, x, None, bwd, device) for n, m in refs.items()})
            times, graphs = _timed(steps, device, sz)
            for n in refs:
                row = _ratio_row(f"PLUTO-4S {mode}, patch {p}{tag}", times["ours"], times[n], sz["s_batch"],
                                 flops, 3 if bwd else 1, peak, n)
                row.update(section="vits", mode=mode, patch=p, batch=sz["s_batch"],
                           target=TARGETS[f"vits {mode}"], **graphs)
                yield row
        if eager is not None:  # compiled vs eager outputs, same weights, same precision
            with torch.no_grad(), _autocast(device):
                cos = _cosine(ours.eval().forward_features(x[:8], p)["patch"],
                              eager.eval().forward_features(x[:8], p)["patch"])
            yield _check(f"PLUTO-4S compiled vs eager, patch {p}, min token cosine", cos, cos >= 0.999,
                         ">= 0.999")
        del refs, x
        _free()


def run_vitg(args, device: torch.device, sz: dict, tag: str) -> Iterator[dict]:
    from openpluto.model import build_model, maybe_compile
    from openpluto.model.flops import model_forward_flops

    torch.manual_seed(0)
    with device:
        ours = build_model("pluto4g", img_size=sz["g_img"], **sz["g_over"])
    maybe_compile(ours, args.compile)
    ref = _timm_vitg(sz["g_img"], sz["g_over"], device)
    maybe_compile(ref, args.compile_timm)
    x = torch.randn(sz["g_batch"], 3, sz["g_img"], sz["g_img"], device=device)
    flops = model_forward_flops(ours.cfg, sz["g_img"], 14)
    for backend in args.attention:
        ours.set_attention_backend(backend)
        times, graphs = _timed({"ours": _step(ours, x, 14, True, device),
                                "timm": _step(ref, x, None, True, device)}, device, sz)
        row = _ratio_row(f"PLUTO-4G fwd+bwd, attention {backend}{tag}", times["ours"], times["timm"],
                         sz["g_batch"], flops, 3, args.peak_tflops if device.type == "cuda" else None,
                         "timm ViT-G/14 reg4")
        row.update(section="vitg", mode="fwd+bwd", patch=14, batch=sz["g_batch"], attention=backend,
                   target=TARGETS["vitg fwd+bwd"], **graphs)
        if device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        yield row
    del ours, ref, x
    _free()


def _pretrain_step_module():
    """benchmarks/pretrain_step.py (interface 4: ``measure_step`` / ``measure_loader``), or None."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        import pretrain_step
    except ImportError as e:
        print(f"benchmarks/pretrain_step.py: not available ({e})")
        return None
    return pretrain_step


def run_ssl(args, device: torch.device, sz: dict, tag: str) -> Iterator[dict]:
    mod = _pretrain_step_module()
    preset, batch, steps = sz["ssl"]
    row = {"section": "ssl", "check": f"SSL step, {preset}, batch {batch}, patch 16{tag}",
           "target": TARGETS["ssl"]}
    if mod is None or not hasattr(mod, "measure_step"):
        yield {**row, "status": "not available (benchmarks/pretrain_step.py has no measure_step yet)"}
        return
    r = mod.measure_step(preset, batch, 16, str(device), steps)
    yield {**row, "step_ms": round(float(r["step_ms"]), 2), "bare_ms": round(float(r["bare_ms"]), 2),
           "overhead": round(float(r["overhead"]), 3), "details": r}


def run_loader(args, device: torch.device, sz: dict, tag: str) -> Iterator[dict]:
    mod = _pretrain_step_module()
    preset, batch, workers, batches = sz["loader"]
    row = {"section": "loader", "check": f"loader, {preset}, {workers} workers vs patch-32 step{tag}",
           "target": TARGETS["loader"]}
    if mod is None or not (hasattr(mod, "measure_loader") and hasattr(mod, "measure_step")):
        yield {**row, "status": "not available (benchmarks/pretrain_step.py has no measure_loader yet)"}
        return
    loader = mod.measure_loader(preset, batch, workers, str(device), batches)
    step = mod.measure_step(preset, batch, 32, str(device), max(2, sz["ssl"][2] // 2))
    consumes = batch / (float(step["step_ms"]) / 1000)
    ips = float(loader["images_per_s"])
    yield {**row, "loader_img_s": round(ips, 1), "step32_img_s": round(consumes, 1),
           "ratio": round(ips / consumes, 3), "details": {"loader": loader, "step": step}}


RUNNERS = {"numerics": run_numerics, "vits": run_vits, "vitg": run_vitg, "ssl": run_ssl, "loader": run_loader}


# ----------------------------------------------------------------------------------------- output

def _fmt(r: dict) -> str:
    """One Markdown table row: check | openpluto | reference | ratio | target."""
    if "status" in r:
        return f"| {r['check']} | {r['status']} | | | {r.get('target', '')} |"
    if r["section"] == "numerics":
        return f"| {r['check']} | {r['value']:.6g} | | **{'ok' if r['ok'] else 'FAIL'}** | {r['limit']} |"
    if r["section"] in ("vits", "vitg"):
        pct = f", {r['ours_pct_peak']}% of peak" if "ours_pct_peak" in r else ""
        rpct = f", {r['ref_pct_peak']}%" if "ref_pct_peak" in r else ""
        late = f"; {r['graphs_after_warmup']} graphs after warm-up" if r.get("graphs_in_warmup") else ""
        return (f"| {r['check']} | {r['ours_img_s']} img/s ({r['ours_tflop_s']} TFLOP/s{pct}{late}) | "
                f"{r['ref']}: {r['ref_img_s']} img/s{rpct} | **{r['ratio']:.2f}x** | {r['target']} |")
    if r["section"] == "ssl":
        return (f"| {r['check']} | {r['step_ms']} ms | bare backbone passes {r['bare_ms']} ms | "
                f"**{r['overhead']:.2f}x** | {r['target']} |")
    return (f"| {r['check']} | {r['loader_img_s']} img/s | the patch-32 step consumes "
            f"{r['step32_img_s']} img/s | **{r['ratio']:.2f}x** | {r['target']} |")


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads()}
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        env["timm"] = "missing"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def write_table(out: Path, peak_tflops: float) -> str:
    """Merge ``out/parts/*.json`` into ``out/gpu_suite.json`` and ``out/gpu_suite.md``; return the table."""
    parts = [json.loads(p.read_text()) for p in sorted((out / "parts").glob("*.json"))]
    order = {s: i for i, s in enumerate(SECTIONS)}
    parts.sort(key=lambda p: (order.get(p["section"], 99), p.get("compiled", False)))
    rows = [r for p in parts for r in p["rows"]]
    env = parts[0]["environment"] if parts else {}
    quick = " QUICK MODE (tiny models, 1 iteration: the numbers mean nothing);" if any(
        p.get("quick") for p in parts) else ""
    where = env.get("gpu", env.get("device", "?"))
    versions = f"torch {env.get('torch', '?')}, timm {env.get('timm', '?')}"
    lines = [f"openpluto GPU suite:{quick} {where}, {versions}; bf16 autocast on CUDA; "
             f"peak {peak_tflops:g} TFLOP/s dense bf16",
             "", "| check | openpluto | reference (same run) | ratio | target |", "|---|---|---|---|---|"]
    lines += [_fmt(r) for r in rows]
    def name(p: dict) -> str:
        return f"{p['section']}{' (compiled)' if p.get('compiled') else ''}"

    failed = [f"{name(p)}: {p['error']}" for p in parts if p.get("error")]
    cut = [f"{name(p)} after {p.get('seconds', '?')} s" for p in parts if not p.get("finished")]
    if failed:
        lines += ["", "Sections that failed:"] + [f"- {f}" for f in failed]
    if cut:
        lines += ["", "Sections stopped before the end (time limit), rows above are what they measured:"]
        lines += [f"- {c}" for c in cut]
    table = "\n".join(lines) + "\n"
    (out / "gpu_suite.md").write_text(table)
    (out / "gpu_suite.json").write_text(json.dumps({"environment": env, "peak_tflops": peak_tflops,
                                                    "parts": parts}, indent=2))
    return table


def _write_part(path: Path, part: dict, t0: float) -> None:
    part["seconds"] = round(time.perf_counter() - t0, 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(part, indent=2, default=str))
    tmp.replace(path)


def run_section(section: str, args, device: torch.device, sz: dict, env: dict) -> bool:
    """Run one section, writing its part file after every row (a section killed by its time limit
    keeps what it measured); True if it finished without an exception."""
    t0 = time.perf_counter()
    tag = " (compiled)" if args.compile else ""
    part = {"section": section, "compiled": args.compile, "quick": args.quick, "environment": env, "rows": []}
    path = args.out / "parts" / f"{section}{'-compiled' if args.compile else ''}.json"
    ok = True
    try:
        for row in RUNNERS[section](args, device, sz, tag):
            print(_fmt(row), flush=True)
            part["rows"].append(row)
            _write_part(path, part, t0)
    except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
        traceback.print_exc()
        part["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        ok = False
    part["finished"] = True
    _write_part(path, part, t0)
    print(f"{section}{tag}: {part['seconds']} s", flush=True)
    _free()
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for parts/*.json, gpu_suite.json/.md")
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: auto)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run these sections only")
    ap.add_argument("--compile", action="store_true", help="compile openpluto's blocks (maybe_compile)")
    ap.add_argument("--compile-timm", action="store_true", help="compile the timm references too")
    ap.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"],
                    help="PLUTO-4S modes (vits section; default: both)")
    ap.add_argument("--attention", nargs="+", choices=("auto", "cudnn", "flash", "efficient"),
                    default=["auto", "cudnn"], help="PLUTO-4G SDPA backends tried first (vitg section)")
    ap.add_argument("--quick", action="store_true", help="tiny models, one iteration: a start-up check")
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="dense bf16 peak of the GPU for %% of peak (default: 790, issue 11's H200 figure)")
    ap.add_argument("--table", action="store_true", help="only merge OUT/parts/*.json into the table")
    args = ap.parse_args(argv)
    (args.out / "parts").mkdir(parents=True, exist_ok=True)
    if args.table:
        print(write_table(args.out, args.peak_tflops), end="")
        return 0
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cpu" and not args.quick:
        print("warning: a full run on the CPU takes hours; use --quick for a start-up check", flush=True)
    env = environment(device)
    print(f"gpu_suite on {env.get('gpu', device)}: torch {env['torch']}, timm {env['timm']}"
          f"{', compiled' if args.compile else ''}{', quick' if args.quick else ''}", flush=True)
    sz = _sizes(args.quick)
    results = [run_section(s, args, device, sz, env) for s in (args.only or SECTIONS)]
    print(write_table(args.out, args.peak_tflops), end="")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
