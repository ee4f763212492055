from __future__ import annotations

import csv
import json
from pathlib import Path

from openpluto.cli.main import main

FAST = ["--mpp", "1", "2", "--tile-size", "128", "--tiles-per-slide", "4", "--workers", "2", "--no-qc"]


def test_tiles_over_the_real_folder(wsi_dir, tmp_path, capsys):
    out = tmp_path / "real"
    assert main(["tiles", str(wsi_dir), "--out", str(out), *FAST]) == 3  # some slides failed
    errors = {r["slide_id"]: r for r in csv.DictReader(Path(out / "errors.csv").read_text().splitlines())}
    failed = {k for k, r in errors.items() if r["kind"] != "warning"}
    # boxes (353 µm/px) and wsi2dcm-jpeg (16.8 µm/px) are coarser than every target: no tile, a failure
    assert failed == {"broken", "unreadable", "pathml-small_dicom", "tcga-cr-7395-01a-01-ts1", "kidney-48-5",
                      "boxes", "wsi2dcm-jpeg"}
    assert "--mpp-override" in errors["tcga-cr-7395-01a-01-ts1"]["error"]
    assert "--allow-upsample" in errors["boxes"]["error"]
    assert all(r["stage"] == "tiles" for r in errors.values())
    for r in errors.values():  # one line that names the file once
        assert "\n" not in r["error"] and r["error"].count(r["path"].split("/")[-1]) == 1, r["error"]
    done = {p.stem for p in (out / "done").glob("*.json")}
    assert done == {"CMU-1-Small-Region"}  # the fluorescence NDPI is left out (bright-field only)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["slide"] for r in summary["slides_left_out_modality"]] == ["test3-DAPI-2-387"]
    assert "left out 1 slide(s) that are not brightfield" in capsys.readouterr().err
    assert main(["tiles", str(wsi_dir / "test3-DAPI-2-387.ndpi"), "--out", str(out), *FAST,
                 "--modality", "fluorescence"]) == 0
    ndpi = json.loads((out / "done" / "test3-DAPI-2-387.json").read_text())
    assert ndpi["levels"] == {"1": 2, "2": 3} and ndpi["n_tiles"] == 8 and ndpi["modality"] == "fluorescence"


def test_tcga_with_override_and_ndpi_all_four_mpps(wsi_dir, tmp_path):
    out = tmp_path / "o"
    args = [
        "tiles",
        str(wsi_dir / "tcga-cr-7395-01a-01-ts1.svs"),
        str(wsi_dir / "test3-DAPI-2-387.ndpi"),
        "--out",
        str(out),
        "--mpp",
        "0.25",
        "0.5",
        "1",
        "2",
        "--tile-size",
        "64",
        "--tiles-per-slide",
        "2",
        "--mpp-override",
        "0.5",
        "--no-qc",
        "--modality",
        "any",
    ]
    assert main(args) == 0
    tcga = json.loads((out / "done" / "tcga-cr-7395-01a-01-ts1.json").read_text())
    assert tcga["mpp_source"] == "override" and tcga["n_tiles"] > 0
    assert tcga["levels"] == {"0.5": 0, "1": 1, "2": 1}  # 0.25 refused: finer than the 0.5 override
    ndpi = json.loads((out / "done" / "test3-DAPI-2-387.json").read_text())
    assert ndpi["mpp_source"] == "metadata"
    assert ndpi["levels"] == {"0.25": 0, "0.5": 1, "1": 2, "2": 3}
    assert all(v == 2 for v in ndpi["tiles"].values())


def test_tissue_command(wsi_dir, tmp_path, capsys):
    out = tmp_path / "t"
    rc = main(
        [
            "tissue",
            str(wsi_dir / "CMU-1-Small-Region.svs"),
            str(wsi_dir / "corrupt" / "broken.svs"),
            "--out",
            str(out),
        ]
    )
    assert rc == 3  # one slide done, one failed
    for suffix in ("_mask.png", "_overlay.png", ".geojson", ".json"):
        assert (out / f"CMU-1-Small-Region{suffix}").is_file()
    fc = json.loads((out / "CMU-1-Small-Region.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"]
    rows = list(csv.DictReader(Path(out / "errors.csv").read_text().splitlines()))
    assert [r["slide_id"] for r in rows] == ["broken"] and rows[0]["stage"] == "tissue"
    assert "CMU-1-Small-Region" in capsys.readouterr().out


def test_bad_flag_value_is_one_line_error(tmp_path, capsys):
    assert main(["tiles", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists()  # a failed start leaves no output folder
    assert "nope.svs: no such slide file or folder" in capsys.readouterr().err


def test_a_shard_names_the_part_files_it_wrote(tmp_path, capsys):
    """Under --shard I/N the closing lines point at this shard's parts, where its failures are."""
    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide at all")
    assert main(["tissue", str(bad), "--out", str(tmp_path / "t"), "--shard", "0/2"]) == 1
    said = capsys.readouterr().out
    assert "1 failed (see " in said and "errors.part-0-of-2.csv)" in said, said
    assert (tmp_path / "t" / "errors.part-0-of-2.csv").is_file()
    assert main(["tiles", str(bad), "--out", str(tmp_path / "o"), "--shard", "0/2", *FAST]) == 1
    said = capsys.readouterr().out
    assert "manifest.part-0-of-2.csv, errors.part-0-of-2.csv, summary.part-0-of-2.json" in said, said
    assert (tmp_path / "o" / "errors.part-0-of-2.csv").is_file()
