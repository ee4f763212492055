"""``openpluto embed`` at the cohort level (issue 13): ids, no silent skip, timeouts, exit codes, refusals."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from _embed_utils import MODEL, MPP, TILE, embed_config

from openpluto.cli.main import main
from openpluto.embed import read_slide_h5, run_embed


def _cli(inputs, out, *extra) -> list[str]:
    return ["embed", *map(str, inputs), "--model", MODEL, "--out", str(out), "--mpp", str(MPP),
            "--tile-size", str(TILE), "--max-tiles", "3", "--workers", "0", "--threads", "1", "--no-pictures",
            "--no-progress", *extra]


def _errors(out: Path, name: str = "errors.csv") -> list[dict]:
    with open(out / name) as f:
        return list(csv.DictReader(f))


def test_same_name_from_two_folders_is_embedded_not_skipped(cohort, tmp_path):
    a, b = tmp_path / "a" / "s.tiff", tmp_path / "b" / "s.tiff"
    for src, dst in ((cohort[0], a), (cohort[1], b)):
        dst.parent.mkdir()
        shutil.copy(src, dst)
    out = tmp_path / "out"
    run_embed(embed_config([a], out, max_tiles=3, workers=0), progress=False, log=None)
    summary = run_embed(embed_config([b], out, max_tiles=3, workers=0), progress=False, log=None)
    assert (summary.embedded, summary.skipped) == (1, 0)  # not "already done": another slide
    files = {p.stem: read_slide_h5(p)["attrs"] for p in out.glob("*.h5")}
    assert set(files) == {"s", next(k for k in files if k.startswith("s_"))}
    assert {f["slide_path"] for f in files.values()} == {str(a), str(b)}
    assert all(f["slide_id"] == k for k, f in files.items())
    # both again, in one run: both already done, nothing duplicated
    summary = run_embed(embed_config([a, b], out, max_tiles=3, workers=0), progress=False, log=None)
    assert (summary.embedded, summary.skipped, summary.failed) == (0, 2, 0)
    assert len(list(out.glob("*.h5"))) == 2


def test_huge_header_and_hanging_plan_fail_with_one_line_and_exit_codes(cohort, tmp_path, capsys,
                                                                         huge_header_tiff):
    huge = huge_header_tiff
    out = tmp_path / "o"
    assert main(_cli([cohort[2], huge], out)) == 3  # some failed
    (row,) = _errors(out)
    assert row["path"] == str(huge) and "200000 x 200000" in row["error"] and row["stage"] == "embed"
    assert main(_cli([huge], tmp_path / "o2")) == 1  # none done
    assert main(["embed-pca", str(huge), "--model", MODEL, "--out", str(tmp_path / "p.png")]) == 1
    capsys.readouterr()
    # The slide plan (open, mask, grid) runs isolated: past --timeout it is abandoned, named in one line.
    assert main(_cli([cohort[2]], tmp_path / "o3", "--timeout", "0.001")) == 1
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:"))
    assert str(cohort[2]) in line and "timed out" in line
    assert _errors(tmp_path / "o3")[0]["kind"] == "timeout"


def test_shard_flag_splits_the_cohort(cohort, tmp_path):
    out = tmp_path / "o"
    parts = [run_embed(embed_config(cohort, out, max_tiles=2, workers=0, shard=f"{i}/2"), progress=False,
                       log=None) for i in (0, 1)]
    assert sum(p.embedded for p in parts) == 3 and all(p.embedded for p in parts)
    assert sorted(p.stem for p in out.glob("*.h5")) == sorted(p.stem for p in cohort)
    assert (out / "errors.part-0-of-2.csv").is_file() and (out / "summary.part-1-of-2.json").is_file()
    with pytest.raises(Exception, match="--shard"):
        run_embed(embed_config(cohort, out, shard="2/2"), progress=False, log=None)
    # A failure in a shard is reported under the file it went to, the shard's part of errors.csv.
    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide at all")
    lines: list[str] = []
    run_embed(embed_config([bad], tmp_path / "o2", shard="0/2"), progress=False, log=lines.append)
    assert "1 failed -> errors.part-*-of-2.csv" in lines[-1], lines[-1]
    assert [r["path"] for r in _errors(tmp_path / "o2", "errors.part-0-of-2.csv")] == [str(bad)]
