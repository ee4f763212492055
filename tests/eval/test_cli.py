"""`openpluto embed-images` and `openpluto eval ...` end to end (small data, few steps)."""

import csv
import json
import shlex
import shutil

import h5py
import numpy as np
import pytest
from _eval_utils import TinyEncoder, write_colour_dataset
from PIL import Image

from openpluto.cli.main import main
from openpluto.embed.images import ImageRecords, embed_images, save_image_features


def _features_file(tmp_path, encoder, name, n=6):
    rec = ImageRecords.from_source(write_colour_dataset(tmp_path / f"data_{name}", n, size=32))
    feats, *_ = embed_images(encoder, rec, resize=32, progress=False)
    path = tmp_path / f"{name}.h5"
    save_image_features(path, feats, rec, {"model": name, "model_label": name, "weights_hash": name})
    return path


def test_linear_knn_table_and_rerun(tmp_path, capsys):
    good = _features_file(tmp_path, TinyEncoder(seed=0), "colour-aware")
    noise_enc = TinyEncoder(seed=1)
    bad = _features_file(tmp_path, noise_enc, "other")
    with h5py.File(bad, "a") as f:  # an encoder that sees nothing: pure-noise features
        f["features"][...] = np.random.default_rng(0).normal(size=f["features"].shape)
    outs = []
    for feats in (good, bad):
        out = tmp_path / f"lin_{feats.stem}.json"
        assert (
            main(
                [
                    "eval",
                    "linear",
                    "--features",
                    str(feats),
                    "--runs",
                    "2",
                    "--max-steps",
                    "60",
                    "--lr",
                    "0.05",
                    "--task",
                    "colours",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        knn = tmp_path / f"knn_{feats.stem}.json"
        assert (
            main(
                ["eval", "knn", "--features", str(feats), "--k", "5", "--task", "colours", "--out", str(knn)]
            )
            == 0
        )
        outs += [out, knn]
    res = json.loads(outs[0].read_text())
    assert res["settings"]["max_steps"] == 60 and len(res["runs"]) == 2
    assert res["summary"]["balanced_accuracy"]["mean"] > 0.9
    assert res["data"]["evaluated_on"] == "test" and res["data"]["n_per_split"] == {
        "train": 18,
        "val": 18,
        "test": 18,
    }
    # the rerun command alone reproduces the numbers
    argv = shlex.split(res["rerun"])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "again.json")
    assert main(argv) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["runs"] == res["runs"]
    table_md = tmp_path / "table.md"
    capsys.readouterr()
    assert main(["eval", "table", *map(str, outs), "--out", str(table_md)]) == 0
    table = table_md.read_text()
    assert capsys.readouterr().out.startswith("| task | colour-aware | other |")
    rows = [r for r in table.splitlines() if r.startswith("| colours")]
    assert len(rows) == 2 and all(r.split("|")[2].strip().startswith("**") for r in rows)
    assert all(not r.split("|")[3].strip().startswith("**") for r in rows)


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    assert main(["eval", "linear", "--features", str(tmp_path / "nope.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.h5" in err and "\n" not in err
    assert main(["eval", "table", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "x.json").write_text("{}")
    assert main(["eval", "table", str(tmp_path / "x.json")]) == 2
    assert "missing key" in capsys.readouterr().err


def test_one_class_is_refused_by_every_classifier(tmp_path, capsys):

    data = write_colour_dataset(tmp_path / "d", 6, splits=None)
    for extra in ("green", "blue"):
        shutil.rmtree(data / extra)
    for protocol in ("linear", "knn"):
        rc = main(["eval", protocol, "--model", "vit_micro_flexi", "--data", str(data),
                   "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / f"{protocol}.json")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and "only class 'red'" in err and str(data) in err, err
        assert not (tmp_path / f"{protocol}.json").exists()
    labels = tmp_path / "slides.csv"
    labels.write_text("slide,label\na,tumour\nb,tumour\nc,tumour\n")
    rc = main(["eval", "abmil", "--features", str(tmp_path), "--labels", str(labels), "--out",
               str(tmp_path / "abmil.json")])
    assert rc == 2 and "only class 'tumour'" in capsys.readouterr().err


def test_abmil_cli(tmp_path):
    rng = np.random.default_rng(0)
    feats = tmp_path / "feats"
    feats.mkdir()
    rows = []
    for i in range(30):
        lab = i % 2
        x = rng.normal(size=(int(rng.integers(5, 12)), 6)).astype(np.float32)
        x[:2, 0] += 5 * lab
        with h5py.File(feats / f"s{i}.h5", "w") as f:
            f["features"] = x
            f["coords"] = np.zeros((len(x), 2), np.int64)
            f.attrs["model"] = "standin"
        rows.append(
            [f"s{i}", "tumour" if lab else "normal", ["train", "train", "val", "test", "train"][i % 5]]
        )
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["slide", "label", "split"], *rows])
    out = tmp_path / "abmil.json"
    assert (
        main(
            [
                "eval",
                "abmil",
                "--features",
                str(feats),
                "--labels",
                str(labels),
                "--runs",
                "2",
                "--max-epochs",
                "15",
                "--patience",
                "5",
                "--batch-size",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["data"]["classes"] == ["normal", "tumour"] and len(res["runs"]) == 2
    assert res["summary"]["balanced_accuracy"]["mean"] > 0.8 and "macro_f1" in res["summary"]
    (feats / "s3.h5").unlink()
    assert main(["eval", "abmil", "--features", str(feats), "--labels", str(labels), "--out", str(out)]) == 2


def test_regression_cli_matches_rows_by_id(tmp_path):
    rng = np.random.default_rng(0)
    n = 90
    x = rng.normal(size=(n, 20)).astype(np.float32)
    y = np.expm1(np.clip(x[:, :3] + 3, 0, None))
    ids = [f"spot{i}" for i in range(n)]
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["features"] = x
        f["ids"] = np.array(ids, dtype=object)
        f.attrs["model"] = "standin"
    order = rng.permutation(n)  # CSV rows in another order: matching must use the ids
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "fold", "GENE1", "GENE2", "GENE3"])
        for i in order:
            w.writerow([ids[i], i % 3, *y[i]])
    out = tmp_path / "reg.json"
    assert (
        main(
            [
                "eval",
                "regression",
                "--features",
                str(tmp_path / "f.h5"),
                "--targets",
                str(tmp_path / "t.csv"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert len(res["runs"]) == 3 and res["runs"][0]["n_components"] == 20
    assert res["runs"][0]["alpha"] == pytest.approx(100 / (20 * 3))
    assert res["summary"]["pearson_mean"]["mean"] > 0.9 and res["data"]["row_matching"].startswith("by id")


def _model_available() -> bool:
    try:
        from openpluto.model import list_models

        return "vit_micro_flexi" in list_models()
    except Exception:
        return False


needs_model = pytest.mark.skipif(not _model_available(), reason="openpluto.model presets not available")


@needs_model
def test_embed_images_cli_and_linear_with_model(tmp_path):
    data = write_colour_dataset(tmp_path / "d", 4, size=40)
    out = tmp_path / "f.h5"
    assert (
        main(
            [
                "embed-images",
                str(data),
                "--model",
                "vit_micro_flexi",
                "--out",
                str(out),
                "--resize",
                "32",
                "--pooling",
                "cls+mean",
                "--patch-size",
                "8",
            ]
        )
        == 0
    )
    with h5py.File(out, "r") as f:
        assert f["features"].shape == (36, 256) and f.attrs["pooling"] == "cls+mean"
        assert f.attrs["weights_hash"] == "random-init"
    res_path = tmp_path / "lin.json"
    argv = [
        "eval",
        "linear",
        "--model",
        "vit_micro_flexi",
        "--data",
        str(data),
        "--resize",
        "32",
        "--runs",
        "1",
        "--max-steps",
        "20",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(res_path),
    ]
    assert main(argv) == 0
    first = json.loads(res_path.read_text())
    assert main(argv) == 0  # second time from the cache, same numbers (preset init is seeded)
    second = json.loads(res_path.read_text())
    assert second["data"]["cache_hit"] and second["runs"] == first["runs"]


@needs_model
def test_segmentation_cli_with_model(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        (tmp_path / "seg" / split / "images").mkdir(parents=True)
        (tmp_path / "seg" / split / "masks").mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((32, 32), np.uint8)
            mask[: int(rng.integers(8, 24)), :16] = 1
            mask[20:, 20:] = 2
            img = np.where(mask[..., None] > 0, 200, 60).astype(np.uint8).repeat(3, 2)
            Image.fromarray(img).save(tmp_path / "seg" / split / "images" / f"t{i}.png")
            Image.fromarray(mask).save(tmp_path / "seg" / split / "masks" / f"t{i}.png")
    out = tmp_path / "seg.json"
    for p in (8, 16):
        assert (
            main(
                [
                    "eval",
                    "segmentation",
                    "--model",
                    "vit_micro_flexi",
                    "--data",
                    str(tmp_path / "seg"),
                    "--patch-size",
                    str(p),
                    "--max-steps",
                    "4",
                    "--batch-size",
                    "4",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        res = json.loads(out.read_text())
        assert res["data"]["num_classes"] == 3 and res["data"]["token_grid"] == [32 // p, 32 // p]
        assert 0 <= res["summary"]["dice"]["mean"] <= 1 and res["data"]["evaluated_on"] == "val"
    assert (
        main(
            [
                "eval",
                "segmentation",
                "--model",
                "vit_micro_flexi",
                "--data",
                str(tmp_path / "seg"),
                "--patch-size",
                "32",
                "--image-size",
                "48",
                "--out",
                str(out),
            ]
        )
        == 2
    )


def test_real_patches_linear_and_knn(patches_dir, tmp_path, encoder):
    """Real H&E pixels through the whole path (no accuracy claim: 4 images per class)."""
    from openpluto.eval.config import KnnConfig, LinearConfig
    from openpluto.eval.runners import run_knn, run_linear

    data = str(patches_dir / "crc_val_he_7k_sample")
    common = dict(
        model="standin", data=data, resize=32, cache_dir=str(tmp_path), val_fraction=0.25, test_fraction=0.25
    )
    res = run_linear(LinearConfig(**common, runs=1, max_steps=10), encoder)
    assert res["data"]["split"] == "made" and res["data"]["n_per_split"] == {"train": 16, "val": 8, "test": 8}
    assert len(res["data"]["classes"]) == 8
    knn = run_knn(KnnConfig(**common), encoder)
    assert knn["data"]["cache_hit"] and 0 <= knn["summary"]["balanced_accuracy"]["mean"] <= 1
