"""Progress: a tqdm bar on a terminal, whole lines in logs (counted by work, not by time)."""

from __future__ import annotations

import io

from openpluto.progress import PlainProgress, progress, write


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_at_each_tenth_and_no_carriage_returns(monkeypatch):
    monkeypatch.delenv("OPENPLUTO_PROGRESS", raising=False)
    log = io.StringIO()
    bar = progress(total=40, desc="pretrain", unit="step", file=log, interval_s=1e9)
    assert isinstance(bar, PlainProgress)
    for _ in range(40):
        bar.update(1)
        bar.set_postfix(loss="1.234")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 10  # 10%, 20%, ... 100%, and no extra line at close
    assert lines[0].startswith("pretrain: 4/40 step (10%)") and "left" in lines[0]
    assert "loss 1.234" in lines[0]
    assert lines[-1].startswith("pretrain: 40/40 step (100%)") and "took" in lines[-1]


def test_plain_iteration_inner_bars_stay_quiet_and_resumed_counts(monkeypatch):
    monkeypatch.delenv("OPENPLUTO_PROGRESS", raising=False)
    log = io.StringIO()
    assert list(progress(range(5), desc="runs", leave=False, file=log, interval_s=1e9)) == list(range(5))
    assert log.getvalue() == ""  # leave=False: a nested bar writes no lines of its own
    bar = progress(total=10, initial=6, desc="resumed", file=log, interval_s=1e9)
    bar.update(4)
    bar.close()
    assert log.getvalue().splitlines() == [bar.lines[-1]]
    assert bar.lines[-1].startswith("resumed: 10/10 it (100%)")


def test_terminal_gets_tqdm_and_env_overrides(monkeypatch):
    from tqdm import tqdm

    monkeypatch.delenv("OPENPLUTO_PROGRESS", raising=False)
    bar = progress(total=3, file=_Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv("OPENPLUTO_PROGRESS", "plain")
    assert isinstance(progress(total=3, file=_Terminal()), PlainProgress)
    monkeypatch.setenv("OPENPLUTO_PROGRESS", "off")
    log = io.StringIO()
    quiet = progress(total=3, file=log)
    quiet.update(3)
    quiet.close()
    assert log.getvalue() == ""
    assert isinstance(progress(total=3, disable=True, file=_Terminal()), PlainProgress)


def test_write_is_a_plain_line_off_a_terminal(monkeypatch):
    monkeypatch.delenv("OPENPLUTO_PROGRESS", raising=False)
    log = io.StringIO()
    write("failed: a.svs: cannot open", file=log)
    assert log.getvalue() == "failed: a.svs: cannot open\n"
