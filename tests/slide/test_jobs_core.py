"""The job core of tissue/tiles: slide ids, no silent skips or duplicates, settings, exit codes, refusals.

Each test reproduces a case of issue 13 ("one job core for the slide stages") on tiny synthetic slides.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _parking import cli_command, parked_cli, wait_until_parked

from openpluto.cli.main import main

REPO = Path(__file__).resolve().parents[2]
FAST = ["--mpp", "1", "--tile-size", "64", "--tiles-per-slide", "3", "--no-qc"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """Two different 512 px slides both named ``x.tiff`` (folders a/ and b/), one with a non-ASCII name."""
    from openpluto.demo.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("jobslides")
    out = {}
    for key, rel, seed in (("a", "a/x.tiff", 1), ("b", "b/x.tiff", 2), ("jp", "jp/日本 slide.tiff", 3)):
        p = root / rel
        make_synthetic_slide(p, size=512, mpp=0.5, seed=seed, pen=False, blur=False, fold=False)
        out[key] = p
    return out


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "done").glob("*.json")}


def _manifest(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "manifest.csv").read_text().splitlines()))


def _errors(out: Path, name: str = "errors.csv") -> list[dict]:
    return list(csv.DictReader((out / name).read_text().splitlines()))


# ----------------------------------------------------------------------------- case 1 and 2


def test_same_file_name_in_two_folders_is_not_skipped_nor_tiled_twice(slides, tmp_path):
    out = tmp_path / "tiles"
    assert main(["tiles", str(slides["a"]), "--out", str(out), *FAST]) == 0
    assert set(_records(out)) == {"x"}
    # b/x.tiff is another slide with the same name: not "already done" (case 1) ...
    assert main(["tiles", str(slides["b"]), "--out", str(out), *FAST]) == 0
    recs = _records(out)
    assert len(recs) == 2 and "x" in recs
    other = next(k for k in recs if k != "x")
    assert other.startswith("x_") and recs[other]["identity"]["resolved"] == str(slides["b"].resolve())
    assert recs["x"]["identity"]["resolved"] == str(slides["a"].resolve())
    # ... and `tiles a b` afterwards tiles neither again (case 2): no duplicate (path, x, y) rows.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    assert main(["tiles", str(slides["a"]), str(slides["b"]), "--out", str(out), *FAST]) == 0
    rows = _manifest(out)
    assert len(rows) == 6 and len({(r["path"], r["x"], r["y"]) for r in rows}) == 6
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")} == mtimes
    assert json.loads((out / "summary.json").read_text())["slides_skipped_already_done"] == 2


def test_ids_are_readable_unique_and_recorded_everywhere(slides, tmp_path):
    from openpluto.jobs.slides import assign_ids

    out = tmp_path / "t"
    assert (
        main(["tiles", str(slides["jp"]), str(slides["a"]), str(slides["b"]), "--out", str(out), *FAST]) == 0
    )
    recs = _records(out)
    assert "日本_slide" in recs  # readable, not collapsed to "_slide"
    xs = sorted(k for k in recs if k.startswith("x_"))
    assert len(xs) == 2  # colliding stems in one run: both get a hash of their resolved path
    rows = _manifest(out)
    assert {r["slide"] for r in rows} == set(recs)
    assert all(r["key"].startswith(r["slide"] + "_m") for r in rows)
    assert assign_ids([Path("日本 slide.tiff"), Path("中国 slide.tiff")]) == ["日本_slide", "中国_slide"]
    tissue = tmp_path / "m"
    assert main(["tissue", str(slides["jp"]), "--out", str(tissue)]) == 0
    info = json.loads((tissue / "日本_slide.json").read_text())
    assert info["slide_id"] == "日本_slide" and (tissue / "日本_slide_mask.png").is_file()


# ----------------------------------------------------------------------------- case 3


def test_other_settings_are_refused_or_redone_with_overwrite(slides, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["tiles", str(slides["a"]), "--out", str(out), *FAST]) == 0
    before = _records(out)["x"]["settings_fingerprint"]
    capsys.readouterr()
    for other in (["--tile-size", "32"], ["--mpp", "2"]):
        args = ["tiles", str(slides["a"]), "--out", str(out), *FAST, *other]
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "other settings" in err and "--overwrite" in err, err
        assert _records(out)["x"]["settings_fingerprint"] == before
    assert (
        main(["tiles", str(slides["a"]), "--out", str(out), *FAST, "--tile-size", "32", "--overwrite"]) == 0
    )
    rec = _records(out)["x"]
    assert rec["settings_fingerprint"] != before and rec["settings"]["tile_size"] == [32]
    assert {r["tile_size"] for r in _manifest(out)} == {"32"}


def test_a_changed_slide_file_is_done_again(slides, tmp_path):
    src = tmp_path / "in" / "c.tiff"
    src.parent.mkdir()
    shutil.copy(slides["a"], src)
    out = tmp_path / "o"
    assert main(["tissue", str(src), "--out", str(out)]) == 0
    first = json.loads((out / "c.json").read_text())
    assert main(["tissue", str(src), "--out", str(out)]) == 0  # same file, same settings: skipped
    assert json.loads((out / "c.json").read_text()) == first
    shutil.copy(slides["b"], src)  # another scan under the same path
    assert main(["tissue", str(src), "--out", str(out)]) == 0
    again = json.loads((out / "c.json").read_text())
    assert again["identity"] != first["identity"] and again["tissue_fraction"] != first["tissue_fraction"]


# ----------------------------------------------------------------------------- case 4 and 5


def test_huge_header_and_oversized_tile_fail_fast_with_one_line(slides, tmp_path, capsys, huge_header_tiff):
    huge = huge_header_tiff
    for stage, extra in (("tissue", []), ("tiles", FAST)):
        out = tmp_path / stage
        assert main([stage, str(huge), "--out", str(out), "--timeout", "120", *extra]) == 1
        (row,) = _errors(out)
        assert (
            row["kind"] == "error" and "200000 x 200000" in row["error"] and "copy it again" in row["error"]
        )
    capsys.readouterr()
    out = tmp_path / "big-tile"
    assert main(["tiles", str(slides["a"]), "--out", str(out), "--mpp", "1", "--tile-size", "100000"]) == 1
    (row,) = _errors(out)
    assert "larger" in row["error"] or "more than the slide" in row["error"]
    assert "--tile-size" in row["error"] and not list((out / "done").glob("*.json"))


def test_timeout_line_names_the_slide(slides, tmp_path, capsys):
    out = tmp_path / "t"
    # No slide can be opened and masked in a millisecond: the worker is killed and the line names the file.
    assert main(["tissue", str(slides["a"]), "--out", str(out), "--timeout", "0.001"]) == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert str(slides["a"]) in line and "timed out" in line
    assert _errors(out)[0]["kind"] == "timeout"


# ----------------------------------------------------------------------------- case 6


def test_bit_rotted_properties_and_unreadable_headers_are_one_line(wsi_dir, tmp_path):
    from openpluto.slide.reader import SlideError, _parse_mpp, open_slide

    data = bytearray((wsi_dir / "CMU-1-Small-Region.svs").read_bytes())
    at = data.find(b"StripeWidth")
    data[at + 2] = 0xFF  # one flipped byte in a property name: OpenSlide lists it, then cannot read it
    rot = tmp_path / "rot.svs"
    rot.write_bytes(bytes(data))
    with pytest.raises(SlideError, match=r"rot.svs: the slide metadata is corrupt \(property"):
        open_slide(rot)
    # a property holding an array (tiffslide parses some tags so) is no numpy "truth value" error
    assert _parse_mpp({"tiffslide.mpp-x": np.array([0.5, 0.5])}, ("tiffslide.mpp-x",)) is None


def test_error_lines_do_not_repeat_the_file_name(tmp_path, capsys):
    fake = tmp_path / "fake.svs"
    fake.write_text("not a slide")
    assert main(["tiles", str(fake), "--out", str(tmp_path / "o"), *FAST]) == 1
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:"))
    assert line.count("fake.svs") == 1, line
    assert line.startswith(f"error: {fake}: cannot open as a slide")


# ----------------------------------------------------------------------------- case 7


def test_skipped_entries_are_reported_and_count_as_failed(slides, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slides["a"], folder / "good.tiff")
    (folder / "gone.svs").symlink_to(tmp_path / "missing.svs")
    (folder / "x.svs").mkdir()
    (folder / ".hidden.svs").write_text("")
    (folder / "notes.txt").write_text("not a slide, not reported")
    out = tmp_path / "o"
    assert main(["tiles", str(folder), "--out", str(out), *FAST]) == 3
    err = capsys.readouterr().err
    assert "gone.svs: dangling link" in err and "x.svs: is a folder" in err and ".hidden.svs" in err
    assert "notes.txt" not in err
    rows = {Path(r["path"]).name: r for r in _errors(out)}
    assert rows["gone.svs"]["kind"] == rows["x.svs"]["kind"] == rows[".hidden.svs"]["kind"] == "skipped"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slides_ok"] == 1 and summary["slides_failed"] == 2


def test_failed_start_leaves_no_output_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for stage in ("tissue", "tiles"):
        assert main([stage, str(empty), "--out", str(tmp_path / stage)]) == 1
        assert main([stage, str(tmp_path / "nope"), "--out", str(tmp_path / stage)]) == 1
        assert not (tmp_path / stage).exists()
    assert main(["tiles", str(empty), "--out", str(tmp_path / "x"), "--shard", "2/2"]) == 1
    assert not (tmp_path / "x").exists()


# tile_slide parks on the slide at PARK (the signal then always arrives mid-run)
_PARK_TILE_SLIDE = """
import openpluto.slide.tiles as tiles
real = tiles.tile_slide
def parked(job, *a, **k):
    if job.path == {park!r}:
        park(job.slide_id)
    return real(job, *a, **k)
tiles.tile_slide = parked
"""


def test_sigterm_exits_143_and_the_rerun_finishes(slides, tmp_path):
    out, marker = tmp_path / "o", tmp_path / "parked"
    folders = [str(slides[k].parent) for k in ("a", "b", "jp")]
    args = ["tiles", *folders, "--out", str(out), "--mpp", "0.5", "--tile-size", "64", "--no-qc"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = parked_cli(_PARK_TILE_SLIDE.format(park=str(slides["jp"])), marker, *args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until_parked(proc, marker)
    proc.send_signal(signal.SIGTERM)  # a slide is parked mid-run: the run cannot have finished
    _, err = proc.communicate(timeout=1800)  # a hang guard only
    assert proc.returncode == 143, err
    assert "terminated" in err
    again = subprocess.run(cli_command(*args), env=env, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr
    assert len(list((out / "done").glob("*.json"))) == 3 and not list((out / "shards").glob(".partial/*/*"))


def _imported(name: str) -> bool:
    return name in sys.modules


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_preloaded_modules_reach_the_slide_processes_without_an_import(tmp_path, monkeypatch):
    from openpluto.jobs.runner import run_slides

    (tmp_path / "preload_probe_mod.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    jobs = [("a", ("preload_probe_mod",))]
    args = ("probe", _imported, jobs, {"a": tmp_path / "a.svs"}, 1, 600, False, print)
    plain, _ = run_slides(*args)
    assert plain == {"a": False}  # the worker has not imported it
    try:
        loaded, _ = run_slides(*args, preload=("no_such_module_here", "preload_probe_mod"))  # 1st: skipped
        assert loaded == {"a": True}  # the worker inherited it from the process that forked it
    finally:
        sys.modules.pop("preload_probe_mod", None)
