"""The demo's evaluation: kNN and linear probe, pretrained vs its random-init twin, on held-out tiles.

The labelled tiles are drawn with a different seed (and stains) from the slides, so the encoder has
never seen them; ``openpluto eval knn|linear`` score them and ``openpluto eval table`` tabulates the
results. ``Score``/``TaskResult`` turn the results JSONs into the numbers the summary and the report
show: balanced accuracy, the test-set size, the number of classes and the chance level.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from openpluto.demo.commands import CommandLog
from openpluto.demo.config import DemoConfig

TASKS = {  # protocol -> how the report names it
    "knn": "kNN (k = 20, cosine, DINO voting)",
    "linear": "linear probe (eva: AdamW, early stopping on validation)",
}
ENCODERS = ("pretrained", "random")


@dataclass
class Score:
    mean: float
    std: float
    runs: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}" if self.runs > 1 else f"{self.mean:.3f}"


@dataclass
class TaskResult:
    """Balanced accuracy of one protocol for both encoders, with what it was measured on."""

    task: str  # "knn" or "linear"
    pretrained: Score
    random: Score
    n_test: int
    n_train: int
    n_classes: int
    evaluated_on: str  # the split scored ("test")

    @property
    def name(self) -> str:
        return TASKS[self.task]

    @property
    def margin(self) -> float:
        return self.pretrained.mean - self.random.mean

    @property
    def chance(self) -> float:
        return 1.0 / self.n_classes

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name, "margin": round(self.margin, 4),
                "chance": round(self.chance, 4)}


def heldout_tiles(cfg: DemoConfig, folder: Path) -> Path:
    """``folder/{train,val,test}/<class>/*.png``: labelled synthetic tiles, 60/20/20 per class."""
    from openpluto.demo.synthetic import make_synthetic_patch_dataset

    if not (folder / "test").is_dir():
        # A different seed from the slides: tissue and stains the encoder has never seen.
        make_synthetic_patch_dataset(folder, n_per_class=cfg.patches_per_class, size=cfg.tile_size,
                                     mpp=cfg.mpp[0], seed=cfg.seed + 1000)
    return folder


def result_path(ev: Path, task: str, encoder: str) -> Path:
    return ev / f"{task}_{encoder}.json"


def _made_with(path: Path, settings: dict) -> bool:
    """``path`` is a results JSON made with ``settings`` (the demo deletes them when the encoder changes)."""
    try:
        made = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return False
    return all(made.get(k) == v for k, v in settings.items())


def run_evaluation(cfg: DemoConfig, out: Path, models: dict[str, Path], log: CommandLog) -> list[TaskResult]:
    """Score both encoders (``models``: "pretrained"/"random" -> model dir) with kNN and the linear probe;
    results an earlier invocation made with the same settings are kept."""
    ev = out / "eval"
    data = heldout_tiles(cfg, ev / "heldout_tiles")
    common = ["--data", str(data), "--resize", str(cfg.eval_size), "--cache-dir", str(ev / "cache")]
    for label in ENCODERS:
        model = str(models[label])
        same = {"model": model, "data": str(data), "resize": cfg.eval_size}
        knn = result_path(ev, "knn", label)
        log.run_unless_done(["eval", "knn", "--model", model, *common, "--task", "synthetic tissue",
                             "--out", str(knn)], _made_with(knn, same), f"{knn.name} exists")
        lin = result_path(ev, "linear", label)
        log.run_unless_done(["eval", "linear", "--model", model, *common, "--task", "synthetic tissue",
                             "--runs", str(cfg.eval_runs), "--max-steps", str(cfg.eval_steps),
                             "--out", str(lin)],
                            _made_with(lin, {**same, "runs": cfg.eval_runs, "max_steps": cfg.eval_steps}),
                            f"{lin.name} exists")
    files = [str(result_path(ev, t, e)) for e in ENCODERS for t in TASKS]
    log.run(["eval", "table", *files, "--out", str(ev / "table.md")])
    return read_results(ev)


def _score(res: dict) -> Score:
    s = res["summary"][res["primary_metric"]]
    return Score(float(s["mean"]), float(s["std"] or 0.0), int(s.get("n", len(res["runs"]))))


def read_results(ev: Path) -> list[TaskResult]:
    """``TaskResult`` per protocol from ``ev/<task>_<encoder>.json``."""
    out = []
    for task in TASKS:
        res = {e: json.loads(result_path(ev, task, e).read_text()) for e in ENCODERS}
        data = res["pretrained"]["data"]
        split = data.get("evaluated_on", "test")
        counts = data.get("n_per_split", {})
        out.append(TaskResult(task, _score(res["pretrained"]), _score(res["random"]),
                              n_test=int(counts.get(split, 0)), n_train=int(counts.get("train", 0)),
                              n_classes=len(data.get("classes", [])), evaluated_on=split))
    return out
