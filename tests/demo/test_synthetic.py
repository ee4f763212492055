from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from openpluto.demo.synthetic import TISSUE_CLASSES, load_truth, make_synthetic_patch_dataset


def test_truth_saved_beside_slide(synth_slide):
    path, truth = synth_slide
    t = load_truth(path)
    assert t.classes == TISSUE_CLASSES and t.dimensions == (2048, 2048)
    assert np.array_equal(t.class_map, truth.class_map)
    present = set(np.unique(t.class_map[t.class_map >= 0]).tolist())
    assert len(present) >= 5
    assert t.pen.any() and t.blur.any() and t.fold.any()
    assert 0.2 < t.tissue.mean() < 0.8


def test_label_at(synth_slide):
    _, t = synth_slide
    lab = t.labels()
    ys, xs = np.nonzero(lab == 2)
    i = len(ys) // 2
    # A box fully inside one region gets that class; a box on background gets -1.
    box = 2 * t.downsample
    core = ndi.binary_erosion(lab == lab[ys[i], xs[i]], iterations=3)
    yy, xx = np.nonzero(core)
    assert t.label_at(xx[0] * t.downsample, yy[0] * t.downsample, box) == int(lab[yy[0], xx[0]])
    by, bx = np.nonzero(~t.tissue & ~t.pen)
    assert t.label_at(bx[0] * t.downsample, by[0] * t.downsample, t.downsample) == -1


def _colour_and_morphology(root, split):
    colour, morph, y = [], [], []
    for ci, c in enumerate(TISSUE_CLASSES):
        for p in sorted((root / split / c).glob("*.png")):
            im = np.asarray(Image.open(p).convert("RGB")).astype(np.float32)
            g = im.mean(axis=2)
            colour.append(np.concatenate([im.mean((0, 1)), im.std((0, 1))]))
            morph.append([np.abs(ndi.laplace(g)).mean(), (g < 0.8 * g.mean()).mean(), ndi.label(g < 110)[1]])
            y.append(ci)
    return np.array(colour), np.array(morph), np.array(y)


def test_patch_dataset_classes_differ_by_morphology(tmp_path):
    root = make_synthetic_patch_dataset(tmp_path / "patches", n_per_class=30, size=96, seed=0)
    for split in ("train", "val", "test"):
        for c in TISSUE_CLASSES:
            assert len(list((root / split / c).glob("*.png"))) > 0
    ctr, mtr, ytr = _colour_and_morphology(root, "train")
    cte, mte, yte = _colour_and_morphology(root, "test")

    def acc(a, b):
        sc = StandardScaler().fit(a)
        return LogisticRegression(max_iter=3000).fit(sc.transform(a), ytr).score(sc.transform(b), yte)

    # Three crude morphology numbers beat six colour statistics (stains vary per group of patches).
    a_colour, a_morph = acc(ctr, cte), acc(mtr, mte)
    assert a_morph > a_colour and a_morph > 0.7
