"""``DIR/report.html``: the demo's outputs on one page (sections built here, HTML written by ``report``)."""

from __future__ import annotations

import json
from pathlib import Path

from openpluto.demo.config import PRESET, DemoConfig
from openpluto.demo.evaluation import ENCODERS, TaskResult, result_path
from openpluto.demo.report import Bold, Figure, Section, Table, write_report
from openpluto.demo.summary import CLEAR_MARGIN, DemoSummary

ENCODER_NAMES = {"pretrained": f"pretrained {PRESET}", "random": "same architecture, random init"}
OVERLAY_LEGEND = ("Green outline: tissue; blue: pen ink; yellow: blur; red: folds (each excluded from "
                  "the usable tissue). Squares: the tiles cut at each resolution (count in the legend).")


def _results_table(results: list[TaskResult]) -> Table:
    rows = []
    for r in results:
        better = r.pretrained.mean > r.random.mean
        pre, rnd = str(r.pretrained), str(r.random)
        rows.append([r.name, Bold(pre) if better else pre, rnd if better else Bold(rnd), f"{r.margin:+.3f}"])
    r0 = results[0]
    runs = {r.task: r.pretrained.runs for r in results}
    caption = (f"Balanced accuracy on the {r0.evaluated_on} split: {r0.n_test} labelled tiles of "
               f"{r0.n_classes} synthetic tissue classes (chance level {r0.chance:.3f}), drawn with other "
               f"seeds and stains than the slides; kNN and probe are fitted on {r0.n_train} training tiles. "
               f"kNN is deterministic (one run); the linear probe is the mean ± standard deviation over "
               f"{runs.get('linear', 1)} runs with different seeds. Better of the two in bold.")
    return Table(["task", ENCODER_NAMES["pretrained"], ENCODER_NAMES["random"], "difference"], rows, caption)


def _summary_section(cfg: DemoConfig, s: DemoSummary) -> Section:
    p = s.pretraining
    verdict = (f"The pretrained encoder beats its random initialisation by at least {CLEAR_MARGIN:.2f} on "
               "both tasks." if s.clear_win else
               f"The pretrained encoder does not beat its random initialisation by {CLEAR_MARGIN:.2f} on "
               "both tasks.")
    text = (f"{s.n_slides} slides, {s.n_tiles} tiles, {p.steps} pretraining steps of {PRESET} "
            f"({p.minutes:.1f} min), {s.n_embedded} tiles embedded; {s.minutes_total:.1f} min in all. "
            "The encoder is scored on held-out synthetic tissue tiles it never saw, against the same "
            f"architecture at the random initialisation pretraining started from. {verdict}")
    return Section("Summary", text=text, note=s.cut_short_note(),
                   tables=[_results_table(s.results)] if s.results else [])


def _feature_section(s: DemoSummary, out: Path) -> Section:
    fm = s.feature_maps
    if not fm:
        return Section("4. Feature maps", text="No ground truth beside these slides, so no class maps to "
                       "compare with: see figures/pca_*.png for the patch-token PCA of both encoders.")
    knn = fm["knn"]
    table = Table(["encoder", "slide windows classified from the other slides (20-NN), balanced accuracy"],
                  [[ENCODER_NAMES[e], f"{knn[e]:.3f}"] for e in ENCODERS],
                  caption=f"{fm['windows']} windows of {fm['tile_px']} px at {fm['mpp']:g} µm/px from "
                  f"{fm['slides']} synthetic slides, each labelled with the ground-truth class covering at "
                  f"least 60% of its centre; {fm['n_classes']} classes (chance level "
                  f"{1 / fm['n_classes']:.3f}). "
                  "Each slide's windows are classified by their 20 nearest neighbours (cosine) among the "
                  "other slides' windows: other stains, other tissue.")
    text = ("Does each encoder's view of the slides follow the tissue classes? On each synthetic slide the "
            "demo picks the crop holding the most classes and embeds it the way the evaluation embeds "
            f"tiles: a {fm['tile_px']} px window at {fm['mpp']:g} µm/px gives one embedding, and the window "
            f"slides {fm['map_stride_px']} px at a time. Each map colours the windows by the first three "
            "principal components of their embeddings (one PCA per encoder). Where the features follow the "
            "tissue, colour regions line up with the ground-truth classes; at random init they follow "
            "colour and local texture more than the class. The table measures it on every slide. The "
            "patch-token PCA of the first crop, from openpluto embed-pca, is in figures/pca_*.png.")
    return Section("4. Feature maps against the ground truth", text=text, tables=[table],
                   figures=[Figure(out / "figures" / "feature_maps.png",
                                   "Rows: slides. Columns: the crop, its ground-truth classes, the window-"
                                   "embedding map of each encoder (RGB = PC 1-3).", full=True)])


def _detail_table(ev: Path, results: list[TaskResult]) -> Table:
    rows = []
    for r in results:
        for e in ENCODERS:
            res = json.loads(result_path(ev, r.task, e).read_text())
            metric = res["primary_metric"]
            runs = ", ".join(f"{run[metric]:.3f}" for run in res["runs"])
            st = res["settings"]
            how = (f"k = {st.get('k')}, T = {st.get('temperature')}" if r.task == "knn" else
                   f"lr {st.get('lr')}, up to {st.get('max_steps')} steps, patience {st.get('patience')}")
            rows.append([r.name.split(" (")[0], ENCODER_NAMES[e], how, runs, f"{res['seconds']:.1f}"])
    return Table(["task", "encoder", "settings", "balanced accuracy per run", "seconds"], rows,
                 caption="Every setting, the data fingerprint and the command that reruns each line are in "
                 "eval/<task>_<encoder>.json.")


def write_demo_report(cfg: DemoConfig, out: Path, s: DemoSummary, history: str) -> Path:
    curves = out / "run" / "loss_curve.png"
    ev = out / "eval"
    sections = [
        _summary_section(cfg, s),
        Section("1. Tissue detection", text="Thumbnails with tissue and the excluded artifacts (masks and "
                "QuPath GeoJSON in tissue/). " + OVERLAY_LEGEND,
                figures=[Figure(p, p.stem.replace("_overlay", ""))
                         for p in sorted((out / "tiles" / "qc").glob("*_overlay.png"))]),
        Section("2. Training tiles", text="Random tiles from the WebDataset shards at each resolution.",
                figures=[Figure(p, p.stem.replace("mosaic_mpp", "") + " µm/px")
                         for p in sorted((out / "tiles" / "qc").glob("mosaic_mpp*.png"))]),
        Section("3. Pretraining", text="Loss terms and collapse monitors over the run (run/metrics.csv; "
                "TensorBoard logs in run/tb). The losses fall while the teacher's target entropy stays "
                "below its maximum and the student features keep their spread: no collapse.",
                figures=[Figure(curves, "pretraining curves (run/loss_curve.png)", full=True)]),
        _feature_section(s, out),
        Section("5. Slide embeddings", text="First principal component of the tile features over each "
                "slide (embeddings/<slide>.h5, the pretrained encoder).",
                figures=[Figure(p, p.stem) for p in sorted((out / "embeddings").rglob("*pc1*.png"))]),
        Section("6. Evaluation runs", tables=[_detail_table(ev, s.results)] if s.results else []),
        Section("Commands run in this folder", text="Every openpluto command run here, in order, across "
                "reruns (\"# done earlier, skipped\" marks a step a previous run had finished).",
                code=history),
    ]
    footer = f"openpluto demo --out {cfg.out} --steps {cfg.steps}" + (
        f" --minutes {cfg.minutes:g}" if cfg.minutes is not None else "")
    return write_report(out / "report.html", "openpluto demo", sections, footer=footer)
