from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from _parking import cli_command, parked_cli, wait_until_parked
from PIL import Image

from openpluto.demo.synthetic import load_truth
from openpluto.slide import TilesConfig, open_slide
from openpluto.slide.tiles import run_tiles

FAST = dict(mpp=(0.5, 1.0), tile_size=(128,), shard_size=40, workers=2)


def _samples(out: Path) -> dict[str, dict]:
    """All samples of all shards: key -> {"jpg": bytes, "json": dict, "shard": name}."""
    samples: dict[str, dict] = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                d = samples.setdefault(key, {"shard": shard.name})
                assert ext not in d, f"duplicate {m.name}"
                data = tf.extractfile(m).read()
                d[ext] = json.loads(data) if ext == "json" else data
    return samples


@pytest.fixture(scope="module")
def tiled(synth_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles")
    summary = run_tiles([synth_cohort[0].parent], out, TilesConfig(**FAST), progress=False)
    return out, summary


def test_shards_manifest_and_summary(tiled, synth_cohort):
    out, summary = tiled
    assert summary["slides_ok"] == 3 and summary["slides_failed"] == 0
    samples = _samples(out)
    rows = list(csv.DictReader(Path(out / "manifest.csv").read_text().splitlines()))
    assert len(rows) == len(samples) == summary["tiles_total"] > 0
    assert {r["key"] for r in rows} == set(samples)
    assert all(len(_samples_in(out, s)) <= FAST["shard_size"] for s in (out / "shards").glob("*.tar"))
    meta = next(iter(samples.values()))["json"]
    assert {"slide", "x", "y", "mpp", "size", "level", "tissue_fraction"} <= set(meta)
    assert json.loads((out / "summary.json").read_text())["tiles_total"] == len(rows)
    assert (out / "qc" / "slide_000_overlay.png").is_file() and (out / "qc" / "slide_000.geojson").is_file()
    assert (out / "qc" / "mosaic_mpp0.5.png").is_file()
    assert not list((out / "shards").glob(".partial/*/*"))
    # The 0.25 µm/px slide tiles 0.5 from level 1 and 1.0 from level 2; the 0.5 one from levels 0 and 1.
    levels = {(m["json"]["slide"], m["json"]["mpp"]): m["json"]["level"] for m in samples.values()}
    assert levels[("slide_001", 0.5)] == 1 and levels[("slide_001", 1.0)] == 2
    assert levels[("slide_000", 0.5)] == 0 and levels[("slide_000", 1.0)] == 1


def _samples_in(out, shard):
    with tarfile.open(shard) as tf:
        return {m.name.split(".")[0] for m in tf}


def test_every_tile_is_usable_tissue_at_its_mpp(tiled, synth_cohort):
    out, _ = tiled
    samples = _samples(out)
    truths = {p.stem: load_truth(p) for p in synth_cohort}
    slides = {p.stem: open_slide(p) for p in synth_cohort}
    rng = np.random.default_rng(0)
    for key in rng.choice(sorted(samples), min(40, len(samples)), replace=False):
        s = samples[key]
        m = s["json"]
        truth = truths[m["slide"]]
        size_l0 = m["size"] * m["mpp"] / truth.mpp
        assert truth.usable_fraction(m["x"], m["y"], size_l0) >= 0.3
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).astype(float)
        assert img.shape == (m["size"], m["size"], 3)
        # Same pixels as the level-0 region box-averaged to the claimed mpp.
        k = int(round(size_l0))
        ref = slides[m["slide"]].read_level(0, m["x"], m["y"], k, k)
        ref = np.asarray(Image.fromarray(ref).resize((m["size"],) * 2, Image.Resampling.BOX)).astype(float)
        assert np.abs(img - ref).mean() < 10.0
    for s in slides.values():
        s.close()


def test_rerun_skips_finished_slides(tiled, synth_cohort):
    out, first = tiled
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    again = run_tiles([synth_cohort[0].parent], out, TilesConfig(**FAST), progress=False)
    assert again["slides_skipped_already_done"] == 3 and again["tiles_total"] == first["tiles_total"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")} == before


# The writer of a slide parks after 11 samples (one whole shard of 10 and one sample of the next) once
# another slide is done: the kill then always lands mid-slide, mid-shard.
_PARK_MID_SHARD = """
import openpluto.slide.tiles as tiles
from pathlib import Path
real = tiles.shard_writer
def parking_writer(folder, slide_id, max_count):
    writer = real(folder, slide_id, max_count)
    write = writer.write
    def write_then_park(sample):
        write(sample)
        if writer.total == max_count + 1 and list(Path({done!r}).glob("*.json")):
            park(slide_id)
    writer.write = write_then_park
    return writer
tiles.shard_writer = parking_writer
"""


def test_killed_run_then_rerun_has_no_duplicates_or_partials(synth_cohort, tmp_path, tiled):
    out, marker = tmp_path / "killed", tmp_path / "parked"
    args = ["tiles", str(synth_cohort[0].parent), "--out", str(out), "--mpp", "0.5", "1.0",
            "--tile-size", "128", "--shard-size", "10", "--workers", "1", "--no-qc"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = parked_cli(_PARK_MID_SHARD.format(done=str(out / "done")), marker, *args)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    parked_slide = wait_until_parked(proc, marker)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "done" / f"{parked_slide}.json").exists()
    assert list((out / "shards" / ".partial" / parked_slide).glob("*.tar"))  # killed mid-slide
    # Simulate the worst case too: an orphan final shard of an unfinished slide.
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "shards" / "slide_002-000000.tar").write_bytes(b"partial garbage")
    rc = subprocess.run(cli_command(*args), env=env, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    ref_keys = set(_samples(tiled[0]))
    keys = set(_samples(out))
    rows = list(csv.DictReader(Path(out / "manifest.csv").read_text().splitlines()))
    assert keys == ref_keys and len(rows) == len(keys) == len({r["key"] for r in rows})
    assert not list((out / "shards").glob(".partial/*/*"))


def _fluorescence_copy(src: Path, dst: Path) -> Path:
    """A DAPI-like copy of a synthetic slide: dark glass, nuclei signal in the blue channel."""
    from openpluto.demo.synthetic import _write_pyramid

    with open_slide(src) as s:
        rgb = s.read_level(0, 0, 0, *s.dimensions)
        mpp = s.mpp
    dapi = np.zeros_like(rgb)
    dapi[..., 2] = 255 - rgb.mean(2).astype(np.uint8)
    _write_pyramid(dst, dapi, mpp, "deflate", 256)
    return dst


def test_tiles_leave_out_non_brightfield_slides(synth_cohort, tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "he.tiff").symlink_to(synth_cohort[0])
    _fluorescence_copy(synth_cohort[0], slides / "dapi.tiff")
    cfg = dict(mpp=(1.0,), tile_size=(128,), workers=1, timeout=120, qc=False)
    out = tmp_path / "default"
    summary = run_tiles([slides], out, TilesConfig(**cfg), progress=False)
    assert "left out 1 slide(s) that are not brightfield: dapi (fluorescence)" in capsys.readouterr().err
    assert summary["slides_ok"] == 1 and summary["slides_failed"] == 0
    assert [r["slide"] for r in summary["slides_left_out_modality"]] == ["dapi"]
    assert not (out / "done" / "dapi.json").exists() and not list((out / "shards").glob("dapi-*"))
    assert json.loads((out / "done" / "he.json").read_text())["stain"] == "he"
    rows = list(csv.DictReader((out / "manifest.csv").read_text().splitlines()))
    assert rows and {r["modality"] for r in rows} == {"he"}
    meta = next(iter(_samples(out).values()))["json"]
    assert (meta["modality"], meta["stain"]) == ("brightfield", "he")
    # Asked for, the fluorescence slide is tiled, and recorded as such.
    out = tmp_path / "any"
    summary = run_tiles([slides], out, TilesConfig(**cfg, modality="any"), progress=False)
    assert summary["slides_ok"] == 2 and not summary["slides_left_out_modality"]
    rows = csv.DictReader((out / "manifest.csv").read_text().splitlines())
    by_slide = {r["slide"]: r["modality"] for r in rows}
    assert by_slide == {"he": "he", "dapi": "fluorescence"}
    with pytest.raises(Exception, match="modality"):
        TilesConfig(modality="brightfeld").validate()


def test_tiles_real_fluorescence_left_out(wsi_dir, tmp_path, capsys):
    cfg = TilesConfig(mpp=(2.0,), tile_size=(128,), workers=1, timeout=300, qc=False)
    slides = [wsi_dir / "test3-DAPI-2-387.ndpi", wsi_dir / "CMU-1-Small-Region.svs"]
    summary = run_tiles(slides, tmp_path, cfg, progress=False)
    assert "test3-DAPI-2-387 (fluorescence)" in capsys.readouterr().err
    assert summary["slides_ok"] == 1 and summary["tiles_total"] > 0
    assert [r["modality"] for r in summary["slides_left_out_modality"]] == ["fluorescence"]
