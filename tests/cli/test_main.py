"""CLI manners: one-line usage errors, bare ``openpluto`` lists the commands, nothing written on bad input."""

from __future__ import annotations

import pytest

from openpluto.cli.main import main


def _one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_bare_openpluto_lists_the_commands_and_fails(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for cmd in ("tissue", "tiles", "pretrain", "export", "embed", "embed-images", "eval", "demo"):
        assert f"    {cmd}" in out, cmd


@pytest.mark.parametrize("argv, hint", [
    (["pretrain"], "openpluto pretrain --help"),
    (["export", "runs/x"], "openpluto export --help"),
    (["eval"], "openpluto eval --help"),
    (["embed-images", "patches/"], "openpluto embed-images --help"),
    (["demo", "--steps"], "openpluto demo --help"),
    (["demo", "--no-such-flag"], "openpluto demo --help"),
    (["eval", "knn", "--no-such-flag", "1"], "openpluto eval knn --help"),
    (["no-such-command"], "openpluto --help"),
])
def test_a_usage_mistake_is_one_line_naming_the_help(argv, hint, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert line.startswith("error: ") and line.endswith(f"(see {hint})"), line
    assert "usage:" not in captured.err + captured.out


def test_help_and_version_exit_zero(capsys):
    assert main(["--version"]) == 0
    assert main(["demo", "--help"]) == 0
    assert "--steps" in capsys.readouterr().out


@pytest.mark.parametrize("make_argv", [
    lambda t: ["pretrain", "--config", "cpu-tiny", "--data", str(t / "no-tiles"),
               "--out", str(t / "out" / "run")],
    lambda t: ["pretrain", "--config", "no-such-preset", "--data", str(t), "--out", str(t / "out" / "run")],
    lambda t: ["export", str(t / "no-run"), "--out", str(t / "out" / "model")],
    lambda t: ["eval", "knn", "--model", "vit_micro_flexi", "--data", str(t / "no-patches"),
               "--out", str(t / "out" / "knn.json"), "--cache-dir", str(t / "out" / "cache")],
    lambda t: ["eval", "linear", "--model", str(t / "no-model"), "--data", str(t / "no-patches"),
               "--out", str(t / "out" / "linear.json")],
    lambda t: ["embed-images", str(t / "no-patches"), "--model", "vit_micro_flexi", "--out",
               str(t / "out" / "feats.h5")],
    lambda t: ["demo", "--out", str(t / "out" / "demo"), "--slides", str(t / "no-slides")],
    lambda t: ["demo", "--out", str(t / "out" / "demo"), "--slides", str(t / "empty")],
    lambda t: ["demo", "--out", str(t / "out" / "demo"), "--steps", "0"],
])
def test_bad_input_is_one_line_and_writes_nothing(make_argv, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a slide")
    argv = make_argv(tmp_path)
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: "), line
    assert not (tmp_path / "out").exists(), f"{argv} wrote {sorted((tmp_path / 'out').rglob('*'))}"
