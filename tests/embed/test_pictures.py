import numpy as np
import pytest

from openpluto.embed.pictures import feature_pc1, heatmap_image, patch_pca_rgb, save_pc1_heatmap


def test_feature_pc1_streamed_matches_svd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    x[:, 3] += 10 * rng.normal(size=300)  # one dominant direction
    chunks = lambda: (x[s:s + 64] for s in range(0, len(x), 64))  # noqa: E731
    got = feature_pc1(chunks)
    xc = x - x.mean(0)
    ref = xc @ np.linalg.svd(xc, full_matrices=False)[2][0]
    assert got.shape == (300,)
    corr = np.corrcoef(got, ref)[0, 1]
    assert abs(corr) > 0.9999
    np.testing.assert_allclose(np.abs(got), np.abs(ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feature_pc1(x.astype(np.float32)), got, rtol=1e-3, atol=1e-3)
    assert feature_pc1(np.zeros((0, 4))).shape == (0,)


def test_patch_pca_rgb_separates_token_groups():
    rng = np.random.default_rng(1)
    h = w = 6
    tokens = rng.normal(scale=0.1, size=(2, h * w, 16))
    left = np.zeros((h, w), bool)
    left[:, :3] = True
    tokens[:, left.ravel(), 0] += 5.0  # left half of every image differs along one axis
    rgb = patch_pca_rgb(tokens, (h, w))
    assert rgb.shape == (2, h, w, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    red = rgb[..., 0]
    assert abs(red[:, left].mean() - red[:, ~left].mean()) > 0.8
    with pytest.raises(ValueError, match="grid"):
        patch_pca_rgb(tokens, (5, 5))
    fg = patch_pca_rgb(tokens[:, :, :], (h, w), foreground=True)
    assert fg.shape == rgb.shape


def test_heatmap_places_tiles_on_the_thumbnail(tmp_path):
    thumb = np.full((50, 80, 3), 240, np.uint8)
    coords = np.array([[0, 0], [400, 200]])  # level-0; thumbnail downsample 10, tiles 100 px level-0
    grid, cnt = heatmap_image(thumb, 10.0, coords, 100, np.array([1.0, -2.0]))
    assert grid[0:10, 0:10].min() == 1.0 and grid[20:30, 40:50].max() == -2.0
    assert np.isnan(grid[40, 70]) and cnt.sum() == 200
    png = save_pc1_heatmap(tmp_path / "p" / "h.png", thumb, 10.0, coords, 100, np.array([1.0, -2.0]))
    from PIL import Image

    assert Image.open(png).size[0] > 100


def test_embed_pca_cli_on_a_synthetic_slide(cohort, tmp_path):
    from openpluto.cli.main import main

    png = tmp_path / "pca.png"
    rc = main(["embed-pca", str(cohort[0]), "--model", "vit_micro_flexi", "--out", str(png), "--mpp", "1.0",
               "--size", "128", "--patch-size", "8"])
    from PIL import Image

    assert rc == 0 and Image.open(png).size[0] > 300
    assert main(["embed-pca", str(cohort[0]), "--model", "vit_micro_flexi", "--out", str(png),
                 "--size", "100", "--patch-size", "16"]) == 1  # bad usage: 1, like the other slide commands
