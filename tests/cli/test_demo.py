"""The demo end to end with a minimal budget, and its report writer."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from openpluto.cli.main import main
from openpluto.cli.report import Figure, Section, write_report


def _links_resolve(report: Path) -> list[str]:
    """Relative hrefs/srcs of the report that do not exist on disk (data: URIs are inline)."""
    text = report.read_text()
    missing = []
    for ref in re.findall(r'(?:href|src)="([^"]+)"', text):
        if ref.startswith(("data:", "http:", "https:", "#")):
            continue
        if not (report.parent / ref).exists():
            missing.append(ref)
    return missing


def test_report_inlines_figures_and_links_resolve(tmp_path):
    png = tmp_path / "figs" / "a.png"
    png.parent.mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(png)
    report = write_report(tmp_path / "report.html", "t", [
        Section("s", text="hello", figures=[Figure(png, "cap"), Figure(tmp_path / "nope.png", "gone")],
                table=[["task", "a", "b"], ["knn", "**0.9**", "0.5"]]),
    ])
    html = report.read_text()
    assert "data:image/png;base64," in html and "<b>0.9</b>" in html
    assert "missing figure" in html  # a missing figure is listed, not fatal
    assert _links_resolve(report) == []


def test_demo_rejects_a_missing_slides_folder(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "d"), "--slides", str(tmp_path / "nowhere")])
    assert rc == 2
    assert "--slides" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path):
    """The whole loop with a minimal budget (about a minute on 2 cores)."""
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--minutes", "0.5", "--n-slides", "2", "--slide-size", "2048",
               "--patches-per-class", "8", "--eval-runs", "2", "--eval-steps", "100"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_tiles"] > 0 and summary["steps"] >= 20 and summary["n_embedded"] > 0
    for rel in ["report.html", "commands.txt", "tiles/manifest.csv", "pluto-cpu-tiny/model.safetensors",
                "eval/table.md", "figures/pca_pretrained.png", "figures/pca_random.png", "run/metrics.csv"]:
        assert (out / rel).is_file(), rel
    assert list((out / "tissue").glob("*_overlay.png")) and list((out / "embeddings").glob("*.h5"))
    assert _links_resolve(out / "report.html") == []
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6
