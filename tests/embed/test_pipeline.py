"""End-to-end ``run_embed`` on synthetic slides: tiles on tissue, features = model.embed, resumable."""

from __future__ import annotations

import csv
import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from _embed_utils import MPP, TILE, embed_config
from _parking import parked_cli, wait_until_parked

from openpluto.embed import is_complete, read_slide_h5, run_embed
from openpluto.embed.pipeline import TileEmbedder, load_model
from openpluto.errors import OpenPlutoError


def _reference(path, coords, encoder, patch_size=None, pooling="cls"):
    """model.embed on the same pixels: Slide.read + the encoder's mean/std, computed here."""
    from openpluto.slide import open_slide

    with open_slide(path) as s:
        tiles = np.stack([s.read(int(x), int(y), TILE, MPP) for x, y in coords])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(encoder.mean).view(1, 3, 1, 1)) / torch.tensor(encoder.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return encoder.embed(x, patch_size=patch_size, pooling=pooling).numpy()


@pytest.fixture(scope="module")
def embedded(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb")
    cfg = embed_config([cohort[0].parent], out, pictures=True)
    summary = run_embed(cfg, progress=False, log=None)
    return cfg, out, summary


def test_cohort_files_coords_on_tissue_and_features_equal_model(embedded, cohort):
    from openpluto.demo.synthetic import load_truth
    from openpluto.slide import detect_tissue, open_slide

    cfg, out, summary = embedded
    assert (summary.embedded, summary.failed, summary.skipped) == (3, 0, 0)
    encoder = load_model(cfg, torch.device("cpu"))
    for path in cohort:
        d = read_slide_h5(out / f"{path.stem}.h5")
        a = d["attrs"]
        n = len(d["coords"])
        assert n > 10 and d["features"].shape == (n, 128) and d["features"].dtype == np.float32
        assert d["coords"].dtype == np.int64 and d["coords"].shape == (n, 2)
        assert (a["mpp"], a["tile_size"], a["patch_size"], a["pooling"]) == (MPP, TILE, 16, "cls")
        assert a["tile_size_level0"] == 128 and a["slide_mpp"] == 0.5 and a["level"] == 1
        assert a["model"] == "vit_micro_flexi" and a["weights_hash"] == "random-init"
        assert a["openpluto_version"]
        # Every tile is on usable tissue of the mask at the claimed mpp/size (exactly what was stored) ...
        with open_slide(path) as slide:
            mask = detect_tissue(slide)
        size0 = a["tile_size_level0"]
        frac = mask.usable_fraction(d["coords"][:, 0], d["coords"][:, 1], size0)
        assert frac.min() >= 0.5 - 1e-9
        np.testing.assert_allclose(frac, d["tissue_fraction"], atol=1e-6)
        # ... and on tissue of the ground truth (the detector is not perfect at the edges).
        truth = load_truth(path)
        tissue = np.array([truth.tissue[truth.box(x, y, size0)].mean() for x, y in d["coords"]])
        assert tissue.min() >= 0.2 and tissue.mean() >= 0.85, (path.name, tissue.min(), tissue.mean())
        labels = np.array([truth.class_map[truth.box(x, y, size0)].max() for x, y in d["coords"]])
        assert (labels >= 0).all()
        # Same numbers as model.embed on the same pixels.
        sel = np.arange(0, n, max(1, n // 12))
        ref = _reference(path, d["coords"][sel], encoder)
        np.testing.assert_allclose(d["features"][sel], ref, rtol=1e-4, atol=1e-4)
        assert (out / "pictures" / f"{path.stem}_pc1.png").stat().st_size > 1000
    with open(out / "errors.csv") as f:
        rows = list(csv.reader(f))
    assert rows == [["slide_id", "path", "stage", "kind", "error"]]
    a = read_slide_h5(out / f"{cohort[0].stem}.h5")["attrs"]
    assert a["slide_id"] == cohort[0].stem and len(a["settings_fingerprint"]) == 16
    assert json.loads(a["slide_identity"])["resolved"] == str(cohort[0].resolve())


def test_rerun_skips_finished_and_reports_bad_slides(embedded, cohort, tmp_path):
    cfg, out, _ = embedded
    mtimes = {p.stem: (out / f"{p.stem}.h5").stat().st_mtime_ns for p in cohort}
    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide at all")
    empty = tmp_path / "blank.tiff"  # a valid tiled TIFF at 0.5 µm/px with no tissue at all
    tifffile.imwrite(empty, np.full((512, 512, 3), 250, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    summary = run_embed(cfg.replace(inputs=[str(cohort[0].parent), str(bad), str(empty)]), progress=False,
                        log=None)
    assert (summary.skipped, summary.embedded, summary.failed) == (3, 0, 2)
    assert {p.stem: (out / f"{p.stem}.h5").stat().st_mtime_ns for p in cohort} == mtimes
    with open(out / "errors.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted([str(bad), str(empty)])
    for r in rows:  # one line naming the file once
        assert "\n" not in r["error"] and r["error"].count(Path(r["path"]).name) == 1, r["error"]
        assert r["stage"] == "embed" and r["kind"] == "error"
    assert not (out / "broken.h5").exists() and not (out / "blank.h5").exists()
    # A finished file made with other settings is neither skipped silently nor overwritten: refused.
    with pytest.raises(OpenPlutoError, match=r"other settings \(tile_size 64 != 32\).*--overwrite"):
        run_embed(cfg.replace(inputs=[str(cohort[0])], tile_size=32), progress=False, log=None)
    assert (out / f"{cohort[0].stem}.h5").stat().st_mtime_ns == mtimes[cohort[0].stem]


def test_cls_mean_patch_tokens_and_flexi_patch_sizes(cohort, tmp_path):
    one = [cohort[1]]
    cfg = embed_config(one, tmp_path / "a", pooling="cls+mean", save_patch_tokens=True, max_tiles=6,
                       workers=0)
    run_embed(cfg, progress=False, log=None)
    d = read_slide_h5(tmp_path / "a" / f"{cohort[1].stem}.h5")
    assert d["features"].shape == (6, 256) and d["attrs"]["pooling"] == "cls+mean"
    assert d["attrs"]["num_tissue_tiles"] > 6
    assert d["patch_tokens"].shape == (6, 16, 128) and d["patch_tokens"].dtype == np.float16
    mean_tok = d["patch_tokens"].astype(np.float32).mean(1)
    np.testing.assert_allclose(mean_tok, d["features"][:, 128:], atol=1e-2)
    encoder = load_model(cfg, torch.device("cpu"))
    ref = _reference(cohort[1], d["coords"], encoder, pooling="cls+mean")
    np.testing.assert_allclose(d["features"], ref, rtol=1e-4, atol=1e-4)
    # PLUTO-4S presets at every FlexiViT patch size (3 tiles each to stay fast).
    for p in (8, 16, 32):
        cfg = embed_config(one, tmp_path / f"p{p}", model="pluto4s", patch_size=p, max_tiles=3, workers=0,
                           pooling="cls+mean")
        run_embed(cfg, progress=False, log=None)
        with h5py.File(tmp_path / f"p{p}" / f"{cohort[1].stem}.h5") as f:
            assert f["features"].shape == (3, 768) and f.attrs["patch_size"] == p
            assert np.isfinite(f["features"][()]).all()


def test_config_errors_are_one_line_and_leave_no_out_folder(cohort, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(OpenPlutoError, match="divisible"):
        run_embed(embed_config(cohort[:1], out, patch_size=24), progress=False, log=None)
    with pytest.raises(OpenPlutoError, match="no such slide file or folder"):
        run_embed(embed_config([tmp_path / "nope"], out), progress=False, log=None)
    with pytest.raises(OpenPlutoError, match="patch sizes"):
        run_embed(embed_config(cohort[:1], out, tile_size=56, patch_size=14), progress=False, log=None)
    with pytest.raises(OpenPlutoError, match="nope-model"):
        run_embed(embed_config(cohort[:1], out, model="nope-model"), progress=False, log=None)
    assert not out.exists()


def test_embedder_bf16_autocast_close_to_fp32(cohort):
    cfg = embed_config(cohort[:1], "unused")
    encoder = load_model(cfg, torch.device("cpu"))
    batch = torch.randint(0, 256, (4, 3, TILE, TILE), dtype=torch.uint8)
    f32, _ = TileEmbedder(encoder, torch.device("cpu"), 16, "cls", "fp32")(batch)
    b16, _ = TileEmbedder(encoder, torch.device("cpu"), 16, "cls", "bf16")(batch)
    assert f32.dtype == b16.dtype == np.float32
    cos = (f32 * b16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(b16, axis=1)
    assert cos.min() > 0.98


def _cli_args(cfg, out) -> list[str]:
    return [*cfg.inputs, "--model", cfg.model, "--out", str(out), "--mpp", str(cfg.mpp), "--tile-size",
            str(cfg.tile_size), "--batch-size", str(cfg.batch_size), "--workers", "1", "--threads", "1",
            "--no-pictures", "--no-progress"]


HANG_GUARD_S = 1800  # only a deadlock gets near this; no verdict depends on speed


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def test_torchrun_two_ranks_gives_the_same_files(embedded, cohort, tmp_path):
    cfg, ref_dir, _ = embedded
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "openpluto.cli.main", "embed", *_cli_args(cfg, out)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.h5")) == sorted(f"{p.stem}.h5" for p in cohort)
    for p in cohort:
        a, b = read_slide_h5(ref_dir / f"{p.stem}.h5"), read_slide_h5(out / f"{p.stem}.h5")
        assert set(a) == set(b)
        for k in a:
            if k != "attrs":
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert a["attrs"] == b["attrs"]
    # each rank writes its own part; together they are the run's errors.csv / summary.json
    for rank in (0, 1):
        assert (out / f"errors.part-{rank}-of-2.csv").read_text().strip() == "slide_id,path,stage,kind,error"
    parts = [json.loads((out / f"summary.part-{rank}-of-2.json").read_text()) for rank in (0, 1)]
    assert sum(p["embedded"] for p in parts) == 3
    assert "embedded 3 slide(s)" in r.stdout


# the first write to the second slide's file parks (the kill then always lands mid-slide); files are
# told apart by name: a finished writer's id() can be reused by the next one
_PARK_SECOND_SLIDE = """
from openpluto.embed.writer import SlideH5Writer
seen, real = set(), SlideH5Writer.append
def parked(self, *a, **k):
    seen.add(self.f.filename)
    if len(seen) == 2:
        self.f.flush()
        park(self.f.filename)
    return real(self, *a, **k)
SlideH5Writer.append = parked
"""


def test_killed_run_resumes_to_one_complete_file_per_slide(cohort, tmp_path):
    out, marker = tmp_path / "killed", tmp_path / "parked"
    cfg = embed_config([cohort[0].parent], out, batch_size=4)
    cmd = parked_cli(_PARK_SECOND_SLIDE, marker, "embed", *_cli_args(cfg, out))
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        parked_file = wait_until_parked(proc, marker, HANG_GUARD_S)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mid-slide: one file done, the second one's temp open
        proc.communicate()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert len(done_before) == 1
    assert [p.name for p in out.glob(".*.h5.tmp")] == [Path(parked_file).name]  # a partial file ...
    summary = run_embed(cfg, progress=False, log=None)
    assert (summary.skipped, summary.embedded) == (1, 2)
    assert not list(out.glob(".*.tmp"))  # ... which the rerun removed
    files = sorted(out.glob("*.h5"))
    assert [p.name for p in files] == sorted(f"{p.stem}.h5" for p in cohort)
    assert all(is_complete(p) for p in files)
    assert {n: (out / n).stat().st_mtime_ns for n in done_before} == done_before


def _plan_or_misbehave(job):
    """``plan_job``, except that syn_1 hangs and syn_2 crashes its reader process."""
    from openpluto.embed.slides import plan_slide

    if job.key == "syn_1":
        time.sleep(3600)
    if job.key == "syn_2":
        faulthandler.disable()  # pytest's handler would print this process's stack
        os.kill(os.getpid(), signal.SIGSEGV)
    return plan_slide(Path(job.path), job.context, slide_id=job.key, mpp_override=job.mpp_override)


def test_hung_or_crashed_reader_fails_only_its_slide(cohort, tmp_path, monkeypatch):
    import openpluto.embed.slides as slides

    monkeypatch.setattr(slides, "plan_job", _plan_or_misbehave)  # reader processes are forked: they see it
    out = tmp_path / "trouble"
    summary = run_embed(embed_config([cohort[0].parent], out, timeout=30.0, workers=2), progress=False,
                        log=None)
    assert (summary.embedded, summary.failed) == (1, 2)
    assert sorted(p.name for p in out.glob("*.h5")) == ["syn_0.h5"] and is_complete(out / "syn_0.h5")
    assert not list(out.glob(".*.tmp"))
    with open(out / "errors.csv") as f:
        errors = {r["path"]: r for r in csv.DictReader(f)}
    assert "timed out after 30 s planning it" in errors[str(cohort[1])]["error"]
    assert errors[str(cohort[1])]["kind"] == "timeout"
    assert "reader process crashed" in errors[str(cohort[2])]["error"]
    assert errors[str(cohort[2])]["kind"] == "crash"
