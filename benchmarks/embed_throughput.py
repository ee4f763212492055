"""Whole-slide embedding throughput and memory (``openpluto embed``'s pipeline).

1. Throughput: the same tiles of one synthetic slide, (a) end to end -- DataLoader workers read,
   decode and resize tiles while the model embeds the previous batch, rows streamed into the h5 file --
   and (b) model only: the tiles pre-read into memory and fed to the same embedder, same batches, same
   run. The ratio (a)/(b) says how well reading hides behind compute (goal on CPU: >= 0.85).
2. Memory: a full ``run_embed`` of a small and of a large slide, each in a fresh process; peak RSS of
   the main process and of the largest worker (must not grow with the slide size).

    python benchmarks/embed_throughput.py --models pluto4s vit_tiny_flexi --tiles 128 --workers 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _tiles_per_s(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def throughput(slide: Path, args, out_dir: Path) -> dict:
    from openpluto.embed import EmbedConfig
    from openpluto.embed.pipeline import TileEmbedder, embed_slide, load_model, plan_slide
    from openpluto.slide import open_slide

    cfg = EmbedConfig(inputs=[str(slide)], model=args.model, out=str(out_dir), mpp=args.mpp,
                      tile_size=args.tile_size, batch_size=args.batch_size, workers=args.workers,
                      max_tiles=args.tiles, pictures=False, min_tissue=0.25)
    device = torch.device("cpu")
    encoder = load_model(cfg, device)
    patch = int(args.patch_size or encoder.default_patch_size)
    embedder = TileEmbedder(encoder, device, patch, cfg.pooling, "fp32")
    plan = plan_slide(slide, cfg)
    n = len(plan.coords)
    with open_slide(slide) as s:  # the same pixels, in memory, for the model-only pass
        pixels = np.stack([s.read(int(x), int(y), cfg.tile_size, cfg.mpp) for x, y in plan.coords])
    tiles = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    embedder(tiles[: cfg.batch_size])  # warm-up (allocator, kernels)

    results = {"model_only": [], "end_to_end": []}
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        for s in range(0, n, cfg.batch_size):
            embedder(tiles[s:s + cfg.batch_size])
        results["model_only"].append(_tiles_per_s(n, time.perf_counter() - t0))
        t0 = time.perf_counter()
        embed_slide(plan, embedder, cfg, out_dir / f"bench_{rep}.h5", patch, "fp32", progress=False)
        results["end_to_end"].append(_tiles_per_s(n, time.perf_counter() - t0))
    model_only = float(np.median(results["model_only"]))
    end_to_end = float(np.median(results["end_to_end"]))
    return {"tiles": n, "model": encoder.name, "patch_size": patch, "tile_size": cfg.tile_size,
            "batch_size": cfg.batch_size, "workers": cfg.workers, "threads": torch.get_num_threads(),
            "model_only_tiles_per_s": model_only, "end_to_end_tiles_per_s": end_to_end,
            "ratio": end_to_end / model_only, "runs": results}


def memory_child(slide: str, out: str, model: str, mpp: float, tile_size: int, batch: int,
                 workers: int) -> None:
    """Run in a fresh process: full run_embed of one slide, then print peak RSS (MiB) as JSON."""
    from openpluto.embed import EmbedConfig, read_slide_h5, run_embed

    cfg = EmbedConfig(inputs=[slide], model=model, out=out, mpp=mpp, tile_size=tile_size, batch_size=batch,
                      workers=workers, pictures=True, min_tissue=0.25)
    t0 = time.perf_counter()
    run_embed(cfg, progress=False, log=None)
    seconds = time.perf_counter() - t0
    n = len(read_slide_h5(Path(out) / f"{Path(slide).stem}.h5")["coords"])
    kib = 1.0 / 1024  # ru_maxrss is in KiB on Linux
    print(json.dumps({"tiles": n, "seconds": seconds,
                      "peak_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
                      "peak_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib}))


def memory(slide: Path, args, out_dir: Path) -> dict:
    call = ", ".join(repr(v) for v in (str(slide), str(out_dir), args.memory_model, args.mpp, args.tile_size,
                                       args.batch_size, args.workers))
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import embed_throughput as b; "
            f"b.memory_child({call})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    with __import__("openpluto.slide", fromlist=["open_slide"]).open_slide(slide) as s:
        out["slide_px"] = list(s.dimensions)
    out["file_mib"] = slide.stat().st_size / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["pluto4s", "vit_tiny_flexi"],
                    help="models for the throughput test (preset names or model dirs)")
    ap.add_argument("--memory-model", default="vit_micro_flexi", help="model for the memory runs")
    ap.add_argument("--patch-size", type=int, default=None)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--tiles", type=int, default=192, help="tiles in the throughput test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", type=int, default=2048, help="side of the small slide, level-0 px")
    ap.add_argument("--large", type=int, default=8192, help="side of the large slide, level-0 px")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--work-dir", default=None, help="where slides/outputs go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from openpluto.demo.synthetic import make_synthetic_slide

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="embed_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    slides = {}
    for name, side in (("small", args.small), ("large", args.large)):
        p = work / f"bench_{name}_{side}.tiff"
        if not p.is_file():
            make_synthetic_slide(p, size=side, mpp=0.25 if args.mpp >= 0.5 else args.mpp / 2, seed=3)
        slides[name] = p

    res: dict = {"cpu_threads": torch.get_num_threads()}
    res["throughput"] = []
    for model in args.models:
        args.model = model
        res["throughput"].append(throughput(slides["large"], args, work / "tp"))
    tp0 = res["throughput"][0]
    print(f"\nthroughput ({tp0['tiles']} tiles of {tp0['tile_size']} px at {args.mpp} µm/px, batch "
          f"{tp0['batch_size']}, {tp0['workers']} worker(s), {tp0['threads']} torch threads, CPU fp32)")
    print("| model | patch | model only (tiles/s) | end to end (tiles/s) | ratio |\n|---|---|---|---|---|")
    for tp in res["throughput"]:
        print(f"| {tp['model']} | {tp['patch_size']} | {tp['model_only_tiles_per_s']:.1f} | "
              f"{tp['end_to_end_tiles_per_s']:.1f} | {tp['ratio']:.2f} |")
    if not args.skip_memory:
        res["memory"] = {name: memory(p, args, work / f"mem_{name}") for name, p in slides.items()}
        print(f"\npeak memory (full run_embed, {args.memory_model}, tile {args.tile_size} px at "
              f"{args.mpp} µm/px)")
        print("| slide | level-0 px | tiles | peak RSS main (MiB) | peak RSS largest worker (MiB) |")
        print("|---|---|---|---|---|")
        for name, m in res["memory"].items():
            print(f"| {name} | {m['slide_px'][0]}x{m['slide_px'][1]} | {m['tiles']} | "
                  f"{m['peak_main_mib']:.0f} | {m['peak_worker_mib']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
