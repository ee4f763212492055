"""What the demo found, as ``summary.json`` and as the lines printed at the end."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from openpluto.demo.config import DEFAULT_STEPS, PRESET
from openpluto.demo.evaluation import TaskResult
from openpluto.demo.pretraining import PretrainOutcome

CLEAR_MARGIN = 0.10  # balanced accuracy over the random twin that the default demo shows on both tasks
# What the default run gives (README, The demo): pretrained vs random init, balanced accuracy.
EXPECTED = {"knn": (0.925, 0.733), "linear": (0.939, 0.720)}


@dataclass
class DemoSummary:
    n_slides: int
    n_tiles: int
    n_embedded: int
    pretraining: PretrainOutcome
    results: list[TaskResult]
    feature_maps: dict | None = None
    minutes_total: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def clear_win(self) -> bool:
        """The pretrained encoder beats random init by ``CLEAR_MARGIN`` on every task."""
        return all(r.margin >= CLEAR_MARGIN for r in self.results)

    def cut_short_note(self) -> str:
        """Empty unless ``--minutes`` stopped pretraining early: then what happened and what to expect."""
        p = self.pretraining
        if not p.cut_short:
            return ""
        exp = ", ".join(f"{r.task} {EXPECTED[r.task][0]:.2f} vs {EXPECTED[r.task][1]:.2f}"
                        for r in self.results if r.task in EXPECTED)
        return (f"pretraining was cut short by the --minutes cap: {p.steps} of {p.target} steps. "
                f"A shorter run learns less, so expect smaller margins than the full run "
                f"({DEFAULT_STEPS} steps gave {exp} balanced accuracy). Rerun the same command without "
                f"--minutes to finish the remaining {p.target - p.steps} steps (finished steps are kept).")

    def to_dict(self) -> dict:
        return {
            "n_slides": self.n_slides, "n_tiles": self.n_tiles, "n_embedded": self.n_embedded,
            "steps": self.pretraining.steps, "pretraining": asdict(self.pretraining),
            "cut_short": self.pretraining.cut_short,
            "results": [r.to_dict() for r in self.results],
            "clear_win": self.clear_win, "feature_maps": self.feature_maps,
            "minutes_total": self.minutes_total, "notes": self.notes,
        }

    def lines(self) -> list[str]:
        """The summary printed at the end of ``openpluto demo``."""
        p = self.pretraining
        out = [f"openpluto demo finished in {self.minutes_total:.1f} min",
               f"  {self.n_slides} slides, {self.n_tiles} tiles, {p.steps} pretraining steps of {PRESET}"
               f"{' (cut short: ' + str(p.target) + ' asked)' if p.cut_short else ''}, "
               f"{self.n_embedded} tiles embedded"]
        if self.results:
            r0 = self.results[0]
            out.append(f"  balanced accuracy on {r0.n_test} held-out test tiles of {r0.n_classes} classes "
                       f"(chance {r0.chance:.3f}):")
        for r in self.results:
            out.append(f"    {r.task:<7} pretrained {str(r.pretrained):<15} random init {str(r.random):<15} "
                       f"difference {r.margin:+.3f}")
        if self.feature_maps:
            knn = self.feature_maps["knn"]
            out.append(f"  feature maps: slide windows classified from the other slides (20-NN): pretrained "
                       f"{knn['pretrained']:.3f}, random init {knn['random']:.3f}")
        verdict = (f"beats random init by >= {CLEAR_MARGIN:.2f} on every task" if self.clear_win
                   else f"does NOT beat random init by {CLEAR_MARGIN:.2f} on every task")
        out.append(f"  the pretrained encoder {verdict}")
        if p.cut_short:
            out.append("  NOTE: " + self.cut_short_note())
        out += [f"  note: {n}" for n in self.notes]
        return out
