"""Markdown table of results: encoders as columns, tasks as rows, best mean in bold (like PLUTO-4's
Table 1)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def results_table(results: list[dict], digits: int = 3) -> str:
    """Markdown table; each cell ``mean ± std`` of the result's primary metric. A row's best mean is
    bold (all tied bests). Later results replace earlier ones for the same (task, encoder)."""
    rows: dict[str, dict[str, dict]] = {}
    columns: list[str] = []
    for res in results:
        metric = res["primary_metric"]
        row = f"{res['task']} ({res['protocol']}, {metric.replace('_', ' ')})"
        col = res["encoder"].get("label") or res["encoder"].get("name") or "?"
        if col not in columns:
            columns.append(col)
        if col in rows.setdefault(row, {}):
            log.warning("two results for %s / %s; keeping the later one", row, col)
        rows[row][col] = res["summary"][metric]
    header = "| task | " + " | ".join(columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    for row, cells in rows.items():
        means = [c["mean"] for c in cells.values() if c["mean"] == c["mean"]]
        best = max(means) if means else None
        out = []
        for col in columns:
            c = cells.get(col)
            if c is None:
                out.append("–")
                continue
            text = f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}"
            out.append(f"**{text}**" if best is not None and c["mean"] == best and len(cells) > 1 else text)
        lines.append(f"| {row} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"
