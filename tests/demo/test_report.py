"""The report page: HTML tables, compressed inlined figures, and a headless-Chromium check of both."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from openpluto.demo.check_report import check_report, find_chromium, main
from openpluto.demo.report import Bold, Figure, Section, Table, write_report


def _page(tmp_path, **extra):
    photo = tmp_path / "figs" / "photo.png"
    photo.parent.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1600, 3000, 3), dtype=np.uint8)).save(photo)
    sections = [Section("Results", text="first\n\nsecond", note="cut short",
                        tables=[Table(["task", "a", "b"], [["kNN", Bold("0.9"), "0.5"]], caption="12 tiles")],
                        figures=[Figure(photo, "noise"), Figure(tmp_path / "nope.png", "gone")],
                        code="openpluto demo --out " + "x" * 300), *extra.get("sections", [])]
    return write_report(tmp_path / "report.html", "t", sections), photo


def test_report_is_html_with_compressed_figures(tmp_path):
    report, photo = _page(tmp_path)
    html = report.read_text()
    assert "<td><b>0.9</b></td>" in html and "<caption>12 tiles</caption>" in html and "**" not in html
    assert "class='note'" in html and re.search(r"<p>first</p>\s*<p>second</p>", html)
    assert "missing figure" in html  # a missing figure is listed, not fatal
    mime, data = re.search(r'src="data:(image/\w+);base64,([^"]+)"', html).groups()
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert max(img.size) == 1400 and mime == "image/jpeg"  # noise: JPEG beats PNG, downscaled
    assert report.stat().st_size < photo.stat().st_size / 3
    assert re.search(r'<a href="figs/photo.png">', html)  # the full-size file beside the report
    assert "white-space:pre-wrap" in html  # long commands wrap


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    return path


def test_chromium_renders_the_page_and_finds_problems(tmp_path, chromium):
    report, _ = _page(tmp_path)
    shot = tmp_path / "shot.png"
    res = check_report(report, chromium, screenshot=shot)
    assert res["ok"] and res["images"] == 1, res
    assert Image.open(shot).size[0] == 1280
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><h2>6. Benchmark table</h2><pre>| task | a |\n|---|---:|\n| knn | **0.9** |"
                   "</pre><p># Results</p><img alt='broken' src='data:image/png;base64,AAAA'></body></html>")
    res = check_report(bad, chromium)
    assert not res["ok"] and res["broken"] == ["broken"]
    assert "| task | a |" in res["markdown"][0] and "**0.9**" in " ".join(res["markdown"])
    assert "# Results" in res["markdown"]
    assert main([str(bad), "--chromium", chromium]) == 1 and main([str(report), "--chromium", chromium]) == 0


def test_check_report_says_when_no_browser_is_found(tmp_path, monkeypatch, capsys):
    report, _ = _page(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("OPENPLUTO_CHROMIUM", raising=False)
    assert main([str(report)]) == 2
    assert "no Chromium found" in capsys.readouterr().err
