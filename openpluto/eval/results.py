"""Results JSON: every setting, the data fingerprint, per-run numbers, mean ± std and the rerun command."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
from pathlib import Path
from typing import Any

from openpluto.config import to_dict
from openpluto.errors import OpenPlutoError
from openpluto.eval.metrics import mean_std


def rerun_command(protocol: str, settings: dict[str, Any]) -> str:
    """``openpluto eval <protocol> --flag value ...`` reproducing ``settings`` (every non-empty field)."""
    parts = ["openpluto", "eval", protocol]
    for key, value in settings.items():
        if value is None or value == () or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def summarise(runs: list[dict], metrics: list[str]) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "std", "n"}}`` over runs (std with ddof=1)."""
    out = {}
    for m in metrics:
        vals = [float(r[m]) for r in runs if r.get(m) is not None]
        mean, std = mean_std(vals)
        out[m] = {"mean": mean, "std": std, "n": len(vals)}
    return out


def build_results(
    protocol: str,
    cfg: Any,
    task: str,
    encoder: dict,
    data: dict,
    runs: list[dict],
    metrics: list[str],
    primary: str,
    seconds: float,
) -> dict:
    from openpluto import __version__

    settings = to_dict(cfg)
    return {
        "protocol": protocol,
        "task": task,
        "primary_metric": primary,
        "encoder": encoder,
        "summary": summarise(runs, metrics),
        "runs": runs,
        "settings": settings,
        "data": data,
        "rerun": rerun_command(protocol, settings),
        "cwd": os.getcwd(),
        "seconds": round(seconds, 3),
        "openpluto_version": __version__,
        "python": platform.python_version(),
        "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise OpenPlutoError(f"{path}: results file does not exist")
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OpenPlutoError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("protocol", "task", "encoder", "summary", "primary_metric"):
        if key not in res:
            raise OpenPlutoError(f"{path}: missing key '{key}' (not an `openpluto eval` results file)")
    return res


def format_summary(res: dict) -> str:
    lines = [f"{res['protocol']} | task {res['task']} | encoder {res['encoder'].get('label', '?')}"]
    for m, s in res["summary"].items():
        lines.append(f"  {m}: {s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})")
    return "\n".join(lines)
