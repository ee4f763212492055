"""The demo end to end with a few steps (bounded by work, not time), a rerun, and its report."""

from __future__ import annotations

import json
import re
from pathlib import Path

from openpluto.cli.main import main
from openpluto.demo.check_report import check_report, find_chromium

SMALL = ["--steps", "6", "--n-slides", "2", "--slide-size", "2048", "--patches-per-class", "8",
         "--eval-runs", "2", "--eval-steps", "100"]


def _links_resolve(report: Path) -> list[str]:
    """Relative hrefs/srcs of the report that do not exist on disk (data: URIs are inline)."""
    missing = []
    for ref in re.findall(r'(?:href|src)="([^"]+)"', report.read_text()):
        if not ref.startswith(("data:", "http:", "https:", "#")) and not (report.parent / ref).exists():
            missing.append(ref)
    return missing


def test_demo_end_to_end_then_a_rerun_keeps_the_history(tmp_path, capsys):
    """The whole loop with 6 pretraining steps (a few minutes on 2 busy cores), then the same command."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and not summary["cut_short"]  # exactly the work asked for, on any machine
    assert summary["n_slides"] == 2 and summary["n_tiles"] > 0 and summary["n_embedded"] > 0
    for rel in ["report.html", "commands.txt", "tiles/manifest.csv", "pluto-cpu-tiny/model.safetensors",
                "eval/table.md", "figures/pca_pretrained.png", "figures/pca_random.png", "run/metrics.csv",
                "figures/feature_maps.png", "run/loss_curve.png"]:
        assert (out / rel).is_file(), rel
    results = {r["task"]: r for r in summary["results"]}
    assert set(results) == {"knn", "linear"}
    assert results["knn"]["n_classes"] == 6 and results["knn"]["n_test"] == 12  # 2 of 8 per class
    fm = summary["feature_maps"]
    assert fm["crops"] and all(c["classes"] >= 2 for c in fm["crops"])  # crops hold several classes
    assert fm["windows"] > 100 and all(0.0 <= fm["knn"][e] <= 1.0 for e in ("pretrained", "random"))

    html = (out / "report.html").read_text()
    assert _links_resolve(out / "report.html") == []
    assert (out / "report.html").stat().st_size < 5 * 2**20
    assert html.count("<img src=\"data:image/") >= 8 and "<table>" in html
    assert "**" not in html and "|---" not in html and "<pre>| " not in html  # no raw Markdown
    assert "chance level 0.167" in html and "12 labelled tiles of 6 synthetic tissue classes" in html
    assert "knn (balanced_accuracy)" not in html and "kNN (k = 20" in html
    first = capsys.readouterr().out
    assert "$ openpluto pretrain --config cpu-tiny" in first

    assert main(["demo", "--out", str(out), *SMALL]) == 0  # a rerun reuses the finished steps
    second = capsys.readouterr().out
    assert "pretraining for" not in second and "$ openpluto pretrain" not in second
    assert "done earlier (6 steps" in second
    assert "$ openpluto eval knn" not in second and "$ openpluto embed-pca" not in second  # kept, not redone
    assert json.loads((out / "summary.json").read_text())["results"] == summary["results"]
    history = (out / "commands.txt").read_text().splitlines()
    assert sum(h.startswith("# ") and "openpluto demo --out" in h for h in history) == 2  # two invocations
    assert [h for h in history if h.startswith("openpluto pretrain")] == [
        f"openpluto pretrain --config cpu-tiny --data {out}/tiles --out {out}/run --max-steps 6 seed=0"]
    assert any(h.startswith("# done earlier, skipped: openpluto pretrain") for h in history)
    assert any(h.startswith("openpluto export") for h in history)  # the first run's lines stay
    html = (out / "report.html").read_text()
    assert "openpluto pretrain --config cpu-tiny" in html
    assert "done earlier, skipped: openpluto export" in html

    browser = find_chromium()  # rendered in a real browser where one is installed
    if browser is not None:
        res = check_report(out / "report.html", browser)
        assert res["ok"] and res["images"] >= 8, res
