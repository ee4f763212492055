"""Whole-slide embedding throughput: can the readers keep the encoder busy? (``openpluto embed``)

Over a cohort of several slides and >= 20,000 tiles (``--tiles``; synthetic H&E-like slides written
as SVS-like JPEG pyramids with levels 1, 4 and 16 at 0.25 µm/px, hard-linked under several names to
reach the count, plus the real slides of ../shared/data/wsi when present), one run prints:

1. model only: the same batches already in (pinned) host memory -> device -> encoder -> host;
2. ``openpluto embed`` end to end over the list of slides (one reader pool for the run: tissue
   masks, tile grids, reading, the model, h5 files and pictures), with the model already loaded;
3. a TRIDENT-style baseline: per slide, tissue + grid, then a new DataLoader with the same workers
   making one OpenSlide ``read_region`` per tile + PIL resize, the same encoder and h5 writer;
4. where the time goes in (2): reader processes (open, plan, read/decode, resize; CPU-seconds summed
   over workers) and the main process (waiting for tiles, packing, host->device, model, write);
5. the reader alone, one process: the new reader vs one ``read_region`` per tile + resize at
   1 µm/px from a 0.25 µm/px level (a slide with levels 1 and 16), with the pixel difference;
6. peak memory (RSS) of a full ``run_embed`` on a small and on a large slide (fresh process each).

    python benchmarks/embed_throughput.py --device cuda                       # the H200 run
    python benchmarks/embed_throughput.py --device cpu --quick                # 2-core CPU
    python benchmarks/embed_throughput.py --device cpu --quick --models vit_tiny_flexi --skip-memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WSI = REPO.parent / "shared" / "data" / "wsi"
# Real slides used when present: (file, µm/px override or None).
REAL = (("CMU-1-Small-Region.svs", None), ("test3-DAPI-2-387.ndpi", None),
        ("tcga-cr-7395-01a-01-ts1.svs", 0.5))


# ----------------------------------------------------------------------------- slides


def synthetic_slide(path: Path, size: int, seed: int, downsamples=(1, 4, 16)) -> Path:
    """A synthetic H&E-like slide at 0.25 µm/px written as a JPEG pyramid with these level downsamples."""
    import tifffile

    from openpluto.demo.synthetic import make_synthetic_slide
    from openpluto.slide.jpegtiff import write_jpeg_pyramid

    if path.is_file():
        return path
    raw = path.with_name(f".raw_{path.name}")
    make_synthetic_slide(raw, size=size, mpp=0.25, seed=seed)
    with tifffile.TiffFile(raw) as t:
        level0 = t.pages[0].asarray()
    write_jpeg_pyramid(path, level0, 0.25, downsamples)
    raw.unlink()
    raw.with_name(raw.name.split(".")[0] + ".truth.npz").unlink(missing_ok=True)
    return path


def build_cohort(args, work: Path, cfg) -> tuple[list[Path], dict[Path, int], str | None]:
    """Slide paths (distinct synthetic slides hard-linked up to ``--tiles`` tiles, + real ones), tiles per
    slide, and the µm/px override CSV for real slides without metadata."""
    from openpluto.embed.slides import plan_slide

    distinct = [synthetic_slide(work / f"syn_{i}.svs", args.slide_size, seed=11 + i)
                for i in range(args.distinct)]
    counts = {p: len(plan_slide(p, cfg).coords) for p in distinct}
    cohort, total, k = [], 0, 0
    while total < args.tiles:
        src = distinct[k % len(distinct)]
        link = work / "cohort" / f"{src.stem}_copy{k // len(distinct):03d}.svs"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.link(src, link)
        cohort.append(link)
        counts[link] = counts[src]
        total += counts[src]
        k += 1
    override = None
    if args.real and WSI.is_dir():
        real = [(WSI / name, mpp) for name, mpp in REAL if (WSI / name).is_file()]
        override = work / "mpp.csv"
        override.write_text("slide,mpp\n" + "".join(f"{p.name},{m}\n" for p, m in real if m is not None))
        for p, _ in real:
            try:
                counts[p] = len(plan_slide(p, cfg.replace(mpp_override=str(override))).coords)
                cohort.append(p)
            except Exception as e:  # noqa: BLE001 - a real slide the settings do not fit
                print(f"(leaving out {p.name}: {e})")
    return cohort, counts, (str(override) if override else None)


# ----------------------------------------------------------------------------- the runs


def model_only(embedder, batches: list[torch.Tensor], n_tiles: int) -> float:
    """tiles/s of host batches -> device -> encoder -> host, one batch in flight (as ``embed_slides``)."""
    for b in batches[:2]:
        embedder.submit(b).result()  # warm-up
    done, i, pending = 0, 0, None
    t0 = time.perf_counter()
    while done < n_tiles:
        b = batches[i % len(batches)]
        nxt = embedder.submit(b)
        if pending is not None:
            pending.result()
        pending, done, i = nxt, done + len(b), i + 1
    pending.result()
    return done / (time.perf_counter() - t0)


def host_batches(path: Path, cfg, n_batches: int, pin: bool) -> list[torch.Tensor]:
    """``n_batches`` batches of real tiles of ``path`` in (pinned) host memory, [B, T, T, 3] uint8."""
    from openpluto.embed.slides import plan_slide
    from openpluto.slide.fastread import TileReader

    coords = plan_slide(path, cfg).coords
    with TileReader(path, cfg.mpp, cfg.tile_size) as r:
        tiles = r.read(np.resize(coords, (cfg.batch_size * n_batches, 2)))
    out = []
    for s in range(0, len(tiles), cfg.batch_size):
        t = torch.from_numpy(tiles[s:s + cfg.batch_size])
        out.append(t.pin_memory() if pin else t)
    return out


def embed_run(cohort, cfg, embedder, patch: int, dtype: str, out: Path) -> dict:
    """``openpluto embed``'s per-slide stage over the cohort (model loaded): tiles/s and the breakdown."""
    from openpluto.embed.embedder import Timings
    from openpluto.embed.slides import SlideTodo, embed_slides
    from openpluto.slide import resolve_mpp
    from openpluto.slide.stream import StreamStats

    timings, reader = Timings(), StreamStats()
    todo = [SlideTodo(p, p.stem, out / f"{p.stem}.h5", resolve_mpp(p, cfg.mpp_override)) for p in cohort]
    embedder.clock.spans.clear()
    t0 = time.perf_counter()
    results = list(embed_slides(todo, cfg, embedder, patch, dtype, progress=False, timings=timings,
                                reader_stats=reader))
    seconds = time.perf_counter() - t0
    tiles = sum(r.tiles for r in results)
    failed = [f"{r.path.name}: {r.error}" for r in results if r.error]
    return {"tiles": tiles, "seconds": seconds, "tiles_per_s": tiles / seconds, "failed": failed,
            "main": timings.as_dict(), "readers": reader.as_dict(), "backends": sorted(reader.backends)}


def baseline_run(cohort, cfg, embedder, patch: int, dtype: str, out: Path) -> dict:
    """TRIDENT-style: per slide, plan, then a new DataLoader (same workers), one read_region per tile."""
    from openpluto.embed.dataset import SlideTileDataset, tile_loader
    from openpluto.embed.slides import SlideOutput, plan_slide
    from openpluto.slide import resolve_mpp

    tiles, plan_s = 0, 0.0
    t0 = time.perf_counter()
    for p in cohort:
        t1 = time.perf_counter()
        plan = plan_slide(p, cfg)
        plan_s += time.perf_counter() - t1
        override = resolve_mpp(p, cfg.mpp_override) if cfg.mpp_override else None
        ds = SlideTileDataset(p, plan.coords, cfg.mpp, cfg.tile_size, mpp_override=override)
        loader = tile_loader(ds, cfg.batch_size, cfg.workers, pin_memory=embedder.device.type == "cuda")
        output = SlideOutput(plan, out / f"{p.stem}.h5", cfg, embedder.encoder, patch, dtype)
        for batch in loader:
            feats, toks = embedder(batch)
            output.writer.append(feats, toks)
        tiles += output.finish()
        del loader
    seconds = time.perf_counter() - t0
    return {"tiles": tiles, "seconds": seconds, "tiles_per_s": tiles / seconds, "plan_s": plan_s}


def reader_alone(path: Path, tile: int, mpp: float, max_tiles: int) -> dict:
    """One process: ``TileReader`` vs ``Slide.read`` (one read_region per tile + resize), same tiles."""
    from openpluto.slide import open_slide
    from openpluto.slide.fastread import TileReader, block_order

    with open_slide(path) as s:
        step = tile * mpp / s.mpp
        w, h = s.dimensions
        level = s.level_for_mpp(mpp)
        g = np.stack(np.meshgrid(np.arange(0, w - step + 1, step), np.arange(0, h - step + 1, step)), -1)
        coords = np.rint(g.reshape(-1, 2)).astype(np.int64)[:max_tiles]
        coords = coords[block_order(coords, step)]
        s.read(int(coords[0, 0]), int(coords[0, 1]), tile, mpp)  # warm the file cache
        t0 = time.perf_counter()
        ref = np.stack([s.read(int(x), int(y), tile, mpp) for x, y in coords])
        per_tile = time.perf_counter() - t0
    res = {"slide_mpp": s.mpp, "level": level, "level_downsample": s.level_downsamples[level],
           "tiles": len(coords), "read_region_tiles_per_s": len(coords) / per_tile}
    for name, dct in (("reader", True), ("reader_no_dct", False)):
        t0 = time.perf_counter()
        with TileReader(path, mpp, tile, dct_scaling=dct) as r:
            got = r.read(coords)
            res[f"{name}_source"] = r.source.describe()
        res[f"{name}_tiles_per_s"] = len(coords) / (time.perf_counter() - t0)
        d = np.abs(got.astype(np.int16) - ref.astype(np.int16))
        res[f"{name}_diff"] = {"mean": float(d.mean()), "p99.9": float(np.percentile(d, 99.9)),
                               "max": int(d.max())}
    return res


def _hwm_mib(pid: int | str = "self") -> float:
    """Peak RSS (VmHWM) of a process's address space in MiB; 0 once it is gone. (ru_maxrss would also
    count the peak of the process that started this one, before exec.)"""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    return out


def memory_child(slide: str, out: str, model: str, mpp: float, tile_size: int, batch: int, workers: int,
                 device: str) -> None:
    """Run in a fresh process: full run_embed of one slide, then print peak RSS (MiB) as JSON.

    The reader processes' peaks are sampled every 0.2 s while they run (each one's VmHWM).
    """
    import threading

    from openpluto.embed import EmbedConfig, run_embed

    cfg = EmbedConfig(inputs=[slide], model=model, out=out, mpp=mpp, tile_size=tile_size, batch_size=batch,
                      workers=workers, pictures=True, min_tissue=0.25, device=device)
    peaks: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            for c in _children(os.getpid()):
                peaks[c] = max(peaks.get(c, 0.0), _hwm_mib(c))

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    s = run_embed(cfg, progress=False, log=None)
    done.set()
    watcher.join()
    print(json.dumps({"tiles": s.tiles, "seconds": time.perf_counter() - t0, "peak_main_mib": _hwm_mib(),
                      "peak_worker_mib": max(peaks.values(), default=0.0)}))


def memory(slide: Path, args, out_dir: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)  # a rerun must embed again, not skip
    call = ", ".join(repr(v) for v in (str(slide), str(out_dir), args.memory_model, args.mpp, args.tile_size,
                                       args.batch_size, args.workers, args.device))
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import embed_throughput as b; " \
           f"b.memory_child({call})"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    from openpluto.slide import open_slide

    with open_slide(slide) as s:
        out["slide_px"] = list(s.dimensions)
    return out


# ----------------------------------------------------------------------------- report


def _table(rows: list[list], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def print_breakdown(run: dict) -> None:
    r, m = run["readers"], run["main"]
    rows = [["reader processes (CPU-s, all workers)", "open slides", f"{r['open_s']:.2f}"],
            ["", "plan (tissue mask + grid)", f"{r['plan_s']:.2f}"],
            ["", "read + decode", f"{r['read_decode_s']:.2f}"],
            ["", "resize + cut", f"{r['resize_s']:.2f}"],
            ["main process (wall s)", "waiting for tiles / device", f"{m['wait']:.2f}"],
            ["", "packing batches", f"{m['pack']:.2f}"],
            ["", "host -> device + normalise", f"{m['h2d']:.2f}"],
            ["", "model", f"{m['model']:.2f}"],
            ["", "device -> host, h5, pictures", f"{m['write']:.2f}"]]
    print(_table(rows, ["where", "stage", "seconds"]))
    print(f"(wall {run['seconds']:.1f} s; readers used: {', '.join(run['backends'])})")


def run_models(args, work: Path, device: torch.device, dtype: str) -> dict:
    """Model only, embed end to end, the TRIDENT-style baseline and the breakdown, per model."""
    from openpluto.embed import EmbedConfig
    from openpluto.embed.embedder import TileEmbedder
    from openpluto.embed.pipeline import _load_checked

    cuda = device.type == "cuda"
    cfg = EmbedConfig(inputs=[], out=str(work / "out"), mpp=args.mpp, tile_size=args.tile_size,
                      batch_size=args.batch_size, workers=args.workers, device=str(device), dtype=dtype)
    t0 = time.perf_counter()
    cohort, counts, override = build_cohort(args, work / "slides", cfg)
    cfg = cfg.replace(mpp_override=override)
    if args.compile:
        if not hasattr(cfg, "compile"):
            sys.exit("--compile: this openpluto has no compile switch yet (EmbedConfig.compile)")
        cfg = cfg.replace(compile=True)
    n_tiles = sum(counts[p] for p in cohort)
    files = len({p.resolve() for p in cohort})
    print(f"cohort: {len(cohort)} slides, {n_tiles} tiles of {args.tile_size} px at {args.mpp} µm/px "
          f"({files} distinct files; made in {time.perf_counter() - t0:.0f} s)")
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'CPU'}), {dtype}, batch "
          f"{args.batch_size}, {args.workers} reader processes, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cores; the machine may be shared (see its load: {os.getloadavg()[0]:.1f})")
    res: dict = {"tiles": n_tiles, "slides": len(cohort), "models": []}

    for model in args.models:
        cfg_m = cfg.replace(model=model)
        encoder, patch = _load_checked(cfg_m.replace(patch_size=args.patch_size), device)
        embedder = TileEmbedder(encoder, device, patch, cfg.pooling, dtype)
        batches = host_batches(cohort[0], cfg_m, 8, pin=cuda)
        mo = model_only(embedder, batches, n_tiles)
        e2e = embed_run(cohort, cfg_m, embedder, patch, dtype, work / f"out_{model}")
        base = None if args.skip_baseline else baseline_run(cohort, cfg_m, embedder, patch, dtype,
                                                            work / f"base_{model}")
        res["models"].append({"model": model, "patch_size": patch, "model_only_tiles_per_s": mo, "embed": e2e,
                              "baseline": base})
        print(f"\n## {model}, patch {patch}")
        rate = e2e["tiles_per_s"]
        rows = [["model only (tiles in host memory)", f"{mo:.1f}", "1.00x"],
                ["`openpluto embed` end to end", f"{rate:.1f}", f"{rate / mo:.2f}x"]]
        if base:
            rows.append(["TRIDENT-style (read_region per tile, pool per slide)", f"{base['tiles_per_s']:.1f}",
                         f"{base['tiles_per_s'] / mo:.2f}x"])
        print(_table(rows, ["pipeline", "tiles/s", "vs model only"]))
        if base:
            print(f"embed vs TRIDENT-style: {e2e['tiles_per_s'] / base['tiles_per_s']:.2f}x "
                  f"(baseline planning {base['plan_s']:.1f} s of {base['seconds']:.1f} s)")
        if e2e["failed"]:
            print("failed:", "; ".join(e2e["failed"]))
        print_breakdown(e2e)
        del embedder, encoder, batches
        if cuda:
            torch.cuda.empty_cache()

    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--quick", action="store_true",
                    help="CPU-sized: 2 distinct slides of 8192 px, 600 tiles (unless set explicitly)")
    ap.add_argument("--models", nargs="*", default=["pluto4s", "vit_tiny_flexi"],
                    help="encoders (preset names or model dirs); none: only the reader and memory parts")
    ap.add_argument("--compile", action="store_true", help="compile the encoder (as embed --compile)")
    ap.add_argument("--patch-size", type=int, default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 32 on CPU")
    ap.add_argument("--workers", type=int, default=None, help="reader processes (default: cores - 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    ap.add_argument("--tiles", type=int, default=None, help="tiles in the cohort (default 20000; quick 600)")
    ap.add_argument("--slide-size", type=int, default=None, help="synthetic slide side, level-0 px "
                                                                 "(default 12288; quick 8192)")
    ap.add_argument("--distinct", type=int, default=None,
                    help="distinct synthetic slides, then hard links (default 4; quick 2)")
    ap.add_argument("--no-real", dest="real", action="store_false", help="leave out ../shared/data/wsi")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--reader-size", type=int, default=None,
                    help="side of the 0.25 µm/px slide of the reader-alone test (default 16384; quick 8192)")
    ap.add_argument("--reader-tiles", type=int, default=400)
    ap.add_argument("--skip-reader", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-model", default="vit_micro_flexi")
    ap.add_argument("--memory-sizes", type=int, nargs=2, default=None,
                    help="small and large slide of the memory test (default 4096 24576; quick 2048 12288)")
    ap.add_argument("--work-dir", default=None, help="slides and outputs (default: a temp dir; reused)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    from openpluto.distributed import DistInfo
    from openpluto.embed.pipeline import resolve_device

    device = resolve_device(args.device, DistInfo())
    cuda = device.type == "cuda"
    q = args.quick
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 2)
    args.tiles = args.tiles or (600 if q else 20000)
    args.distinct = args.distinct or (2 if q else 4)
    args.slide_size = args.slide_size or (8192 if q else 12288)
    args.reader_size = args.reader_size or (8192 if q else 16384)
    args.memory_sizes = args.memory_sizes or ([2048, 12288] if q else [4096, 24576])
    args.device = str(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if cuda else "fp32")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="embed_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    res: dict = {"args": vars(args)}
    if args.models:
        res.update(run_models(args, work, device, dtype))
    if not args.skip_reader:
        res["reader_alone"] = print_reader_alone(args, work)
    if not args.skip_memory:
        res["memory"] = print_memory(args, work)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


def print_reader_alone(args, work: Path) -> dict:
    flat = synthetic_slide(work / "slides" / f"flat_{args.reader_size}.svs", args.reader_size, seed=5,
                           downsamples=(1, 16))
    ra = reader_alone(flat, args.tile_size, 1.0, args.reader_tiles)
    print(f"\n## reader alone, one process: {ra['tiles']} tiles of {args.tile_size} px at 1 µm/px from the "
          f"{ra['slide_mpp']:g} µm/px level (level {ra['level']}, downsample {ra['level_downsample']:g})")
    rows = [["one read_region per tile + resize (`Slide.read`)", f"{ra['read_region_tiles_per_s']:.1f}",
             "1.00x", "-"]]
    for name, label in (("reader", "new reader"), ("reader_no_dct", "new reader, --no-dct-scaling")):
        d = ra[f"{name}_diff"]
        rows.append([f"{label} ({ra[f'{name}_source']})", f"{ra[f'{name}_tiles_per_s']:.1f}",
                     f"{ra[f'{name}_tiles_per_s'] / ra['read_region_tiles_per_s']:.2f}x",
                     f"mean {d['mean']:.2f} / p99.9 {d['p99.9']:.0f} / max {d['max']}"])
    print(_table(rows, ["reader", "tiles/s", "ratio", "abs diff vs Slide.read (grey levels)"]))
    return ra


def print_memory(args, work: Path) -> dict:
    res = {}
    for side in args.memory_sizes:
        p = synthetic_slide(work / "slides" / f"mem_{side}.svs", side, seed=7)
        res[side] = memory(p, args, work / f"mem_{side}")
    print(f"\n## peak memory: full run_embed of one slide ({args.memory_model}, {args.workers} workers, "
          f"batch {args.batch_size})")
    rows = [[f"{m['slide_px'][0]}x{m['slide_px'][1]}", m["tiles"], f"{m['peak_main_mib']:.0f}",
             f"{m['peak_worker_mib']:.0f}"] for m in res.values()]
    head = ["slide (level-0 px)", "tiles", "peak RSS main (MiB)", "peak RSS largest reader (MiB)"]
    print(_table(rows, head))
    return res


if __name__ == "__main__":
    main()
