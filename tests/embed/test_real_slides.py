"""``run_embed`` on the real slides in ../shared/data/wsi (skipped when absent)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from _embed_utils import embed_config

from openpluto.embed import read_slide_h5, run_embed
from openpluto.embed.pipeline import load_model

MPP, TILE = 2.0, 64


def test_real_cohort_tiles_on_tissue_features_equal_model_and_bad_slides_reported(wsi_dir, tmp_path):
    from openpluto.slide import detect_tissue, open_slide

    out = tmp_path / "out"
    override = tmp_path / "mpp.csv"
    override.write_text("slide,mpp\nkidney-48-5.tif,0.5\n")
    names = ["CMU-1-Small-Region.svs", "test3-DAPI-2-387.ndpi", "kidney-48-5.tif", "boxes.tiff",
             "wsi2dcm-jpeg.dcm", "pathml-small_dicom.dcm", "corrupt/broken.svs"]
    cfg = embed_config([wsi_dir / n for n in names], out, mpp=MPP, tile_size=TILE, max_tiles=5,
                       mpp_override=str(override))
    summary = run_embed(cfg, progress=False, log=None)
    with open(out / "errors.csv") as f:
        errors = {r["path"]: r["error"] for r in csv.DictReader(f)}
    # Aperio and Hamamatsu NDPI embed ...
    done = {p.stem for p in out.glob("*.h5")}
    assert done == {"CMU-1-Small-Region", "test3-DAPI-2-387"}
    assert summary.embedded == 2 and summary.failed == 5 == len(errors)
    # ... the rest fail one by one with a one-line message naming the file: the flat TIFF gets its mpp
    # from the CSV but has (almost) no tissue; upsampling refused; unreadable files.
    assert "usable tissue" in errors[str(wsi_dir / "kidney-48-5.tif")]
    assert "finer than the scan" in errors[str(wsi_dir / "boxes.tiff")]
    assert "finer than the scan" in errors[str(wsi_dir / "wsi2dcm-jpeg.dcm")]
    for slide, msg in errors.items():
        assert "\n" not in msg and msg.count(Path(slide).name) == 1, msg
    encoder = load_model(cfg, torch.device("cpu"))
    for name in sorted(done):
        d = read_slide_h5(out / f"{name}.h5")
        a = d["attrs"]
        assert d["features"].shape == (5, 128) and a["mpp"] == MPP and a["tile_size"] == TILE
        override = a["mpp_override"] if a["mpp_override"] > 0 else None
        with open_slide(a["slide_path"], mpp_override=override) as s:
            assert a["tile_size_level0"] == round(TILE * MPP / s.mpp) and a["level"] == s.level_for_mpp(MPP)
            size0 = a["tile_size_level0"]
            frac = detect_tissue(s).usable_fraction(d["coords"][:, 0], d["coords"][:, 1], size0)
            tiles = np.stack([s.read(int(x), int(y), TILE, MPP) for x, y in d["coords"]])
        assert frac.min() >= cfg.min_tissue
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(encoder.mean).view(1, 3, 1, 1)) / torch.tensor(encoder.std).view(1, 3, 1, 1)
        np.testing.assert_allclose(d["features"], encoder.embed(x).numpy(), rtol=1e-4, atol=1e-4)


def test_worker_read_error_becomes_one_line(wsi_dir):
    import pytest

    from openpluto.embed import SlideTileDataset, tile_loader
    from openpluto.embed.slides import one_line
    from openpluto.errors import OpenPlutoError

    bad = wsi_dir / "corrupt" / "unreadable.svs"  # opens, but its JPEG tile is corrupt
    ds = SlideTileDataset(bad, np.array([[0, 0]]), mpp=0.499, tile_size=8)
    with pytest.raises(OpenPlutoError) as e:
        next(iter(tile_loader(ds, batch_size=1, workers=1)))
    msg = one_line(e.value)
    assert "\n" not in msg and msg.startswith(str(bad)) and "Original Traceback" in str(e.value)
