from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from openpluto.slide import TissueConfig, detect_tissue, grid_tiles, open_slide
from openpluto.slide.geojson import masks_to_feature_collection
from openpluto.slide.tissue import detect_tissue_rgb


def _to_truth_grid(mask, truth):
    h, w = truth.class_map.shape
    return (
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BILINEAR))
        > 127
    )


@pytest.fixture(scope="module")
def synth_result(synth_slide):
    path, truth = synth_slide
    with open_slide(path) as s:
        return detect_tissue(s), truth


def test_tissue_iou_and_artifact_exclusion(synth_result):
    r, truth = synth_result
    assert r.tissue.shape == r.thumbnail.shape[:2] and r.downsample == pytest.approx(4.0)
    assert set(r.artifacts) == {"pen", "blur", "fold"}
    tissue = _to_truth_grid(r.tissue, truth)
    usable = _to_truth_grid(r.usable, truth)
    gt = truth.tissue & ~truth.pen  # ink on glass is not tissue
    iou = (tissue & gt).sum() / (tissue | gt).sum()
    assert iou >= 0.9, iou
    for name in ("pen", "blur"):
        m = getattr(truth, name)
        excluded = 1.0 - (usable & m).sum() / m.sum()
        assert excluded >= 0.9, (name, excluded)
    # Usable tissue is nearly all truly usable.
    assert (usable & truth.usable).sum() / usable.sum() > 0.95


def test_grid_tiles_lie_in_usable_tissue(synth_slide, synth_result):
    path, truth = synth_slide
    r, _ = synth_result
    with open_slide(path) as s:
        for mpp, size in ((0.5, 128), (1.0, 128)):
            coords = grid_tiles(s, r, mpp, size, min_tissue=0.5)
            assert len(coords) > 10
            size_l0 = size * mpp / s.mpp
            fr = np.array([truth.usable_fraction(x, y, size_l0) for x, y, _ in coords])
            assert fr.mean() > 0.8 and (fr >= 0.3).all(), (mpp, fr.mean(), fr.min())
            assert np.abs(fr - coords[:, 2]).mean() < 0.15
            assert (coords[:, 2] >= 0.5).all()
            assert (coords[:, 0] + size_l0 <= s.dimensions[0]).all()


def test_dark_background_fluorescence_not_all_tissue(wsi_dir):
    with open_slide(wsi_dir / "test3-DAPI-2-387.ndpi") as s:
        r = detect_tissue(s)
    assert r.dark_background
    assert 0.5 < r.tissue.mean() < 0.97
    assert not r.artifacts["pen"].any()


def test_bright_real_slide(wsi_dir):
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as s:
        r = detect_tissue(s)
    assert not r.dark_background and 0.2 < r.tissue.mean() < 0.9
    assert r.usable.mean() > 0.8 * r.tissue.mean()


def test_pen_marks_on_real_he(wsi_dir):
    """pathml's DICOM (column-major frames; OpenSlide refuses it) stitched with pydicom: green + blue ink."""
    pydicom = pytest.importorskip("pydicom")
    warnings.filterwarnings("ignore", message=".*Photometric Interpretation.*")
    ds = pydicom.dcmread(str(wsi_dir / "pathml-small_dicom.dcm"))
    frames = ds.pixel_array  # [42, 500, 500, 3]
    rows, cols = (
        int(np.ceil(int(ds.TotalPixelMatrixRows) / 500)),
        int(np.ceil(int(ds.TotalPixelMatrixColumns) / 500)),
    )
    img = np.zeros((rows * 500, cols * 500, 3), np.uint8)
    for i, f in enumerate(frames):
        c, rr = divmod(i, rows)
        img[rr * 500 : (rr + 1) * 500, c * 500 : (c + 1) * 500] = f
    img = img[: int(ds.TotalPixelMatrixRows), : int(ds.TotalPixelMatrixColumns)]
    small = np.asarray(Image.fromarray(img).reduce(4))
    r = detect_tissue_rgb(small, 4.0, 4 * 0.5, TissueConfig())
    assert not r.dark_background
    assert r.artifacts["pen"].mean() > 0.02
    assert r.tissue.mean() > 0.3
    # The ink hugs the tissue; the H&E itself is mostly not called ink.
    assert (r.artifacts["pen"] & r.tissue).sum() < 0.3 * r.tissue.sum()


def test_geojson_polygons(synth_result):
    r, truth = synth_result
    fc = masks_to_feature_collection({"tissue": r.tissue, "pen": r.artifacts["pen"]}, r.downsample, "s")
    json.dumps(fc)
    assert fc["type"] == "FeatureCollection" and fc["features"]
    names = {f["properties"]["classification"]["name"] for f in fc["features"]}
    assert names == {"Tissue", "Pen"}
    area = 0.0
    for f in fc["features"]:
        assert f["geometry"]["type"] == "Polygon"
        for k, ring in enumerate(f["geometry"]["coordinates"]):
            xy = np.array(ring)
            assert ring[0] == ring[-1] and xy.min() >= -r.downsample and xy.max() <= 2048 + r.downsample
            a = 0.5 * abs(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))
            if f["properties"]["name"] == "tissue":
                area += a if k == 0 else -a
    mask_area = r.tissue.sum() * r.downsample**2
    assert abs(area - mask_area) / mask_area < 0.05


# ------------------------------------------------------------------------------------------- modality


def _ihc_like(rgb: np.ndarray, share: float) -> np.ndarray:
    """Recolour an H&E-like thumbnail as IHC: haematoxylin blue, the top ``share`` of stained pixels
    (by optical density) DAB brown, background kept."""
    x = rgb.astype(np.float32)
    od = -np.log((x + 1) / 256).sum(2)
    tissue = od > 0.3
    out = x.copy()
    out[tissue] = (95, 105, 170)
    brown = tissue & (od >= np.quantile(od[tissue], 1 - share))
    out[brown] = (140, 95, 55)
    return out.astype(np.uint8)


def test_modality_synthetic_he_ihc_and_fluorescence(synth_result):
    r, _ = synth_result
    assert (r.modality, r.stain) == ("brightfield", "he") and r.dab_fraction < 0.03
    assert r.matches_modality("brightfield") and r.matches_modality("he") and not r.matches_modality("ihc")
    ihc = detect_tissue_rgb(_ihc_like(r.thumbnail, 0.3), r.downsample, 2.0)
    assert (ihc.modality, ihc.stain) == ("brightfield", "ihc") and ihc.dab_fraction > 0.2
    assert ihc.matches_modality("brightfield") and ihc.matches_modality("ihc")
    assert not ihc.matches_modality("he")
    dark = detect_tissue_rgb(255 - r.thumbnail, r.downsample, 2.0)
    assert (dark.modality, dark.stain) == ("fluorescence", None)
    assert dark.matches_modality("fluorescence") and dark.matches_modality("any")
    assert not dark.matches_modality("brightfield")


def test_modality_real_slides_and_he_patches(wsi_dir, patches_dir):
    with open_slide(wsi_dir / "test3-DAPI-2-387.ndpi") as s:
        assert detect_tissue(s).modality == "fluorescence"
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as s:
        r = detect_tissue(s)
    assert (r.modality, r.stain) == ("brightfield", "he")
    # 450 real H&E tiles side by side as one "slide": H&E, far from the IHC threshold.
    tiles = sorted((patches_dir / "lc25000_lung_dev").glob("*/*.jpeg"))
    grid = np.concatenate([np.asarray(Image.open(p).convert("RGB").reduce(4)) for p in tiles], 1)
    r = detect_tissue_rgb(grid, 1.0, 2.0)
    assert r.stain == "he" and r.dab_fraction < 0.05
