from __future__ import annotations

import numpy as np
import openslide
import pytest
from PIL import Image

from openpluto.slide import MppOverrides, SlideError, open_slide, resolve_mpp


def test_synthetic_slide_opens_with_openslide_at_right_mpp(synth_slide):
    path, truth = synth_slide
    s = openslide.OpenSlide(str(path))
    assert s.properties["openslide.vendor"] == "generic-tiff"
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-4)
    assert s.level_count >= 2 and s.level_dimensions[0] == (2048, 2048)
    with open_slide(path) as slide:
        assert slide.backend == "openslide" and slide.mpp == pytest.approx(0.5, rel=1e-4)
        assert slide.name == "synth" and slide.dimensions == (2048, 2048)


def test_read_at_target_mpp_matches_level0_resized(synth_slide):
    path, _ = synth_slide
    with open_slide(path) as slide:
        tile = slide.read(600, 700, 128, mpp=1.0)
        assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8
        assert slide.level_for_mpp(1.0) == 1  # level 1 is 1 µm/px exactly
        ref = slide.read_level(0, 600, 700, 256, 256)
        ref = np.asarray(Image.fromarray(ref).resize((128, 128), Image.Resampling.BOX)).astype(float)
        assert np.abs(tile.astype(float) - ref).mean() < 8.0
        # A non-power-of-two target: read from level 1, resized by 1/1.5.
        t2 = slide.read(600, 700, (100, 60), mpp=1.5)
        assert t2.shape == (60, 100, 3) and slide.level_for_mpp(1.5) == 1


def test_refuses_upsampling_unless_allowed(synth_slide):
    path, _ = synth_slide
    with open_slide(path) as slide:
        with pytest.raises(SlideError, match="finer than the scan.*--allow-upsample"):
            slide.read(0, 0, 64, mpp=0.25)
        assert slide.read(0, 0, 64, mpp=0.25, allow_upsample=True).shape == (64, 64, 3)


def test_mpp_overrides(tmp_path):
    assert resolve_mpp("a/b.svs", "0.25") == 0.25
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide,mpp\nb.svs,0.5\nc,0.3\n")
    ov = MppOverrides.parse(str(csv))
    assert ov.get("x/b.svs") == 0.5 and ov.get("y/c.tif") == 0.3 and ov.get("d.svs") is None
    with pytest.raises(SlideError, match="neither a number nor an existing CSV"):
        MppOverrides.parse("nope.csv")
    csv.write_text("slide,mpp\nb.svs,-1\n")
    with pytest.raises(SlideError, match="positive"):
        MppOverrides.parse(str(csv))


# ----------------------------------------------------------------------------- real slides


def test_ndpi_levels_for_the_four_targets(wsi_dir):
    with open_slide(wsi_dir / "test3-DAPI-2-387.ndpi") as s:
        assert s.level_count == 7
        assert [s.level_for_mpp(m) for m in (0.25, 0.5, 1.0, 2.0)] == [0, 1, 2, 3]
        assert s.read(1000, 1000, 275, 2.0).shape == (275, 275, 3)


def test_cmu_refuses_025(wsi_dir):
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as s:
        assert s.mpp == pytest.approx(0.499)
        with pytest.raises(SlideError, match="CMU-1-Small-Region.svs: target 0.25"):
            s.level_for_mpp(0.25)


def test_tcga_needs_override(wsi_dir):
    p = wsi_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(SlideError, match=r"tcga-cr-7395-01a-01-ts1.svs: no µm/px.*--mpp-override"):
        open_slide(p)
    with open_slide(p, mpp_override=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "override"
        assert s.read(0, 0, 64, 1.0).shape == (64, 64, 3) and s.level_for_mpp(1.0) == 1


def test_flat_tiff_falls_back_to_tiffslide(wsi_dir):
    with open_slide(wsi_dir / "kidney-48-5.tif", mpp_override=0.5) as s:
        assert s.backend == "tiffslide" and s.dimensions == (1493, 901)
        assert s.read(100, 100, 50, 1.0).shape == (50, 50, 3)


@pytest.mark.parametrize("name", ["pathml-small_dicom.dcm", "corrupt/broken.svs"])
def test_bad_files_one_line_error(wsi_dir, name):
    with pytest.raises(SlideError) as e:
        open_slide(wsi_dir / name)
    msg = str(e.value)
    assert name.split("/")[-1] in msg and "\n" not in msg


def test_unreadable_opens_but_read_fails(wsi_dir):
    with open_slide(wsi_dir / "corrupt/unreadable.svs") as s, pytest.raises(SlideError) as e:
        s.read(0, 0, 16, s.mpp)
    assert "unreadable.svs" in str(e.value) and "\n" not in str(e.value)


def test_dicom_wsi_opens(wsi_dir):
    with open_slide(wsi_dir / "wsi2dcm-jpeg.dcm") as s:
        assert s.dimensions == (957, 715) and s.mpp == pytest.approx(16.783, rel=1e-3)
