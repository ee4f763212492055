"""The throughput reader (raw JPEG tiles, DCT scaling, block reads) against ``Slide.read``.

Tolerance (README, "The reader"): tiles from a stored pyramid level are the same pixels as
``Slide.read``; tiles decoded with DCT scaling differ by a mean of at most 4 and a 99.9th
percentile of at most 40 grey levels (box-like IDCT reduction vs PIL's antialiased bilinear).
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import openpluto.slide.jpegtiff as jpegtiff
from openpluto.slide import SlideError, open_slide
from openpluto.slide.fastread import TileReader, block_order
from openpluto.slide.jpegtiff import best_source, write_jpeg_pyramid

DCT_MEAN, DCT_P999 = 4.0, 40.0


def _reference(path, coords, size, mpp, override=None):
    with open_slide(path, mpp_override=override) as s:
        return np.stack([s.read(int(x), int(y), size, mpp) for x, y in coords])


def _diff(a, b):
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float(np.percentile(d, 99.9)), int(d.max())


def _grid(path, size, mpp, n=24, override=None, shift=0):
    """``n`` tile corners mid-slide on the grid ``grid_tiles`` lays (level-0 px), moved by ``shift``."""
    with open_slide(path, mpp_override=override) as s:
        step = size * mpp / s.mpp
        w, h = s.dimensions
    xs = np.arange(int(w * 0.2 / step), int(w * 0.8 / step) - 1) * step
    ys = np.arange(int(h * 0.2 / step), int(h * 0.8 / step) - 1) * step
    g = np.stack(np.meshgrid(np.rint(xs), np.rint(ys)), -1).reshape(-1, 2).astype(np.int64)
    return g[:n] + shift


@pytest.fixture(scope="module")
def flat_slides(synth_slide, tmp_path_factory):
    """The synthetic slide's level 0 rewritten at 0.25 µm/px with only a 1/8 level: (YCbCr, RGB-coded)."""
    path, _ = synth_slide
    with tifffile.TiffFile(path) as t:
        level0 = t.pages[0].asarray()
    root = tmp_path_factory.mktemp("flat")
    return (write_jpeg_pyramid(root / "flat.tiff", level0, 0.25, (1, 8)),
            write_jpeg_pyramid(root / "flat_rgb.tiff", level0, 0.25, (1, 8), rgb_jpeg=True))


@pytest.mark.parametrize("mpp", [0.5, 1.0, 2.0])
def test_stored_levels_give_the_same_pixels(synth_slide, mpp):
    path, _ = synth_slide
    coords = _grid(path, 64, mpp)
    ref = _reference(path, coords, 64, mpp)
    for backend in ("auto", "openslide"):
        with TileReader(path, mpp, 64, backend=backend) as r:
            assert r.source.kind == ("jpeg" if backend == "auto" else "openslide") and r.source.scale == 1
            np.testing.assert_array_equal(r.read(coords), ref)


def test_dct_scaling_within_tolerance_and_exact_without(flat_slides):
    flat, _ = flat_slides
    coords = _grid(flat, 64, 1.0)
    ref = _reference(flat, coords, 64, 1.0)  # level 0 (0.25 µm/px) read and resized 4x by PIL
    with TileReader(flat, 1.0, 64) as r:
        assert (r.source.kind, r.source.level, r.source.scale) == ("jpeg", 0, 4)
        mean, p999, _ = _diff(r.read(coords), ref)
        assert 0 < mean <= DCT_MEAN and p999 <= DCT_P999
    with TileReader(flat, 1.0, 64, dct_scaling=False) as r:
        assert r.source.scale == 1
        np.testing.assert_array_equal(r.read(coords), ref)
    with TileReader(flat, 0.6, 64) as r:  # 2.4x: DCT 1/2, then PIL resizes the remaining 1.2x
        assert r.source.scale == 2
        assert _diff(r.read(coords), _reference(flat, coords, 64, 0.6))[0] <= DCT_MEAN


def test_rgb_coded_jpeg_reads_as_rgb(flat_slides):
    _, rgb = flat_slides
    with tifffile.TiffFile(rgb) as t:
        assert int(t.pages[0].photometric) == 2  # Aperio-style: JPEG data is R, G, B
    coords = _grid(rgb, 64, 0.25)
    with TileReader(rgb, 0.25, 64) as r:
        assert r.source.kind == "jpeg"
        np.testing.assert_array_equal(r.read(coords), _reference(rgb, coords, 64, 0.25))


def test_a_raw_decode_that_disagrees_falls_back_to_openslide(flat_slides, monkeypatch):
    flat, _ = flat_slides
    decode = jpegtiff.decode_jpeg
    monkeypatch.setattr(jpegtiff, "decode_jpeg", lambda data, scale=1: 255 - decode(data, scale))
    coords = _grid(flat, 64, 0.25, n=4)
    with TileReader(flat, 0.25, 64) as r:
        assert r.source.kind == "openslide"  # the self-check on open caught it
        np.testing.assert_array_equal(r.read(coords), _reference(flat, coords, 64, 0.25))


def test_sub_pixel_corners_within_tolerance(synth_slide):
    path, _ = synth_slide  # level 2 (4 level-0 px per px) read at corners off its pixel grid
    coords = _grid(path, 64, 2.0, shift=1)
    with TileReader(path, 2.0, 64) as r:
        mean, p999, _ = _diff(r.read(coords), _reference(path, coords, 64, 2.0))
    assert mean <= 1.0 and p999 <= 8


def test_tiles_over_the_edge_are_white_like_slide_read(synth_slide):
    path, _ = synth_slide
    coords = np.array([[2048 - 40, 1000], [1000, 2048 - 10], [2048 - 8, 2048 - 8]])
    ref = _reference(path, coords, 32, 0.5)
    with TileReader(path, 0.5, 32) as r:
        np.testing.assert_array_equal(r.read(coords), ref)
    assert (ref[2, 10:, 10:] == 255).all()


def test_block_order_is_a_permutation_in_blocks():
    g = np.stack(np.meshgrid(np.arange(20) * 100, np.arange(12) * 100), -1).reshape(-1, 2)
    order = block_order(g, 100.0, block=8)
    assert sorted(order.tolist()) == list(range(len(g)))
    first = g[order[:64]]
    assert first[:, 0].max() == 700 and first[:, 1].max() == 700  # the top-left 8 x 8 block first
    assert (g[order[:8], 1] == 0).all() and (np.diff(g[order[:8], 0]) == 100).all()  # row-major inside


def test_best_source_prefers_stored_levels():
    assert best_source([1, 4, 16], 4.0, 1.02, True) == (1, 1)
    assert best_source([1, 4, 16], 8.0, 1.02, True) == (1, 2)
    assert best_source([1, 4, 16], 8.0, 1.02, False) == (1, 1)
    assert best_source([1, 4, 16], 2.2, 1.02, True) == (0, 2)
    assert best_source([1, 4, 16], 0.5, 1.02, True) == (0, 1)
    assert best_source([1, 2, 4, 8], 16.0, 1.02, True) == (3, 2)  # NDPI: OpenSlide's level 4


# ----------------------------------------------------------------------------- real slides


@pytest.mark.parametrize(("name", "mpp", "kind", "scale", "exact"), [
    ("CMU-1-Small-Region.svs", 0.5, "jpeg", 1, True),  # Aperio: JPEGTables + RGB-coded JPEG
    ("CMU-1-Small-Region.svs", 2.0, "jpeg", 4, False),
    ("test3-DAPI-2-387.ndpi", 0.25, "jpeg", 1, True),  # NDPI: restart-marker strips
    ("test3-DAPI-2-387.ndpi", 1.0, "jpeg", 1, False),  # level 2 at sub-pixel offsets
    ("test3-DAPI-2-387.ndpi", 4.0, "jpeg", 2, False),
])
def test_real_jpeg_slides(wsi_dir, name, mpp, kind, scale, exact):
    path = wsi_dir / name
    coords = _grid(path, 64, mpp)
    ref = _reference(path, coords, 64, mpp)
    with TileReader(path, mpp, 64) as r:
        assert (r.source.kind, r.source.scale) == (kind, scale)
        got = r.read(coords)
    if exact:
        np.testing.assert_array_equal(got, ref)
    else:
        mean, p999, _ = _diff(got, ref)
        assert mean <= DCT_MEAN and p999 <= DCT_P999, (mean, p999)


def test_aperio_rgb_jpeg_needs_the_adobe_marker(wsi_dir, monkeypatch):
    path = wsi_dir / "CMU-1-Small-Region.svs"  # component ids 0, 1, 2: libjpeg alone would guess YCbCr
    monkeypatch.setattr(jpegtiff, "ADOBE_RGB", b"")
    with TileReader(path, 0.5, 64) as r:
        assert r.source.kind == "openslide"  # wrong colours: refused by the self-check


@pytest.mark.parametrize(("name", "override", "backend"), [
    ("tcga-cr-7395-01a-01-ts1.svs", 0.5, "openslide"),  # JPEG 2000
    ("wsi2dcm-jpeg.dcm", None, "openslide"),  # DICOM
    ("kidney-48-5.tif", 0.5, "tiffslide"),  # flat, stripped TIFF
])
def test_other_formats_read_through_openslide(wsi_dir, name, override, backend):
    path = wsi_dir / name
    with open_slide(path, mpp_override=override) as s:
        mpp = s.mpp * 2
    coords = _grid(path, 32, mpp, override=override)
    with TileReader(path, mpp, 32, mpp_override=override) as r:
        assert r.source.kind == backend
        got = r.read(coords)
    assert _diff(got, _reference(path, coords, 32, mpp, override))[0] <= DCT_MEAN


def test_unreadable_tile_is_a_one_line_error(wsi_dir):
    bad = wsi_dir / "corrupt" / "unreadable.svs"
    with TileReader(bad, 0.499, 8) as r, pytest.raises(SlideError) as e:
        r.read(np.array([[0, 0]]))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_features_of_dct_scaled_tiles_agree(flat_slides):
    """The DCT-scaled pixels move a (random-init) encoder's features by < 5% of the spread between tiles."""
    import torch

    from openpluto.model import load_encoder

    flat, _ = flat_slides
    coords = _grid(flat, 64, 1.0)
    with TileReader(flat, 1.0, 64) as r:
        assert r.source.scale == 4
        got = r.read(coords)
    ref = _reference(flat, coords, 64, 1.0)
    torch.manual_seed(0)
    enc = load_encoder("vit_micro_flexi")

    def embed(tiles):
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1)
        with torch.inference_mode():
            return enc.embed(x, pooling="cls+mean").numpy()

    a, b = embed(got), embed(ref)
    d = a.shape[1] // 2
    for part in (slice(0, d), slice(d, None)):  # CLS, mean patch token
        diff = np.linalg.norm(a[:, part] - b[:, part], axis=1).mean()
        spread = np.linalg.norm(b[:, part] - b[:, part].mean(0), axis=1).mean()
        assert diff < 0.05 * spread, (diff, spread)
