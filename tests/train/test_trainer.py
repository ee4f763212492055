"""End-to-end pretraining on generated tiles: logs, non-finite handling, kill -9 + resume, export, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import write_folder, write_shards

from openpluto.cli.main import main as cli_main
from openpluto.train.checkpoint import kept_checkpoint_path, kept_steps, load_checkpoint
from openpluto.train.config import load_train_config
from openpluto.train.metrics import read_metrics
from openpluto.train.trainer import NonFiniteLossError, pretrain

REPO = Path(__file__).resolve().parents[2]

# cpu-tiny shrunk further so a step takes a fraction of a second on 2 busy cores.
TINY = [
    "model_overrides.depth=2",
    "model_overrides.embed_dim=64",
    "model_overrides.num_heads=2",
    "ssl.crops.global_size=32",
    "ssl.crops.local_size=16",
    "ssl.crops.n_local=2",
    "ssl.crops.augment.steps=[flip,rot90]",
    "ssl.heads.out_dim=128",
    "ssl.heads.hidden_dim=64",
    "ssl.heads.bottleneck_dim=32",
    "patch_sizes=[8,16]",
    "patch_size_probs=null",
    "data.batch_size=4",
    "data.num_workers=0",
    "log.log_every=1",
    "log.progress=false",
    "schedule.warmup_steps=2",
    "schedule.freeze_last_layer_steps=1",
    "optim.base_lr=2e-3",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("tiles"), 24, per_shard=10, size=48)


def _cfg(data: Path, *extra: str):
    return load_train_config("cpu-tiny", [*TINY, f"data.path={data}", *extra])


def _rows(run: Path) -> dict[int, dict[str, float]]:
    return {int(r["step"]): r for r in read_metrics(run / "metrics.csv")}


def test_short_run_logs_everything_and_exports(shards, tmp_path):
    run = tmp_path / "run"
    summary = pretrain(_cfg(shards, "max_steps=4", "log.checkpoint_every=2"), run)
    assert summary["steps"] == 4 and summary["nonfinite_skipped"] == 0
    rows = _rows(run)
    assert sorted(rows) == [1, 2, 3, 4]
    for key in (
        "total",
        "dino_local",
        "dino_global",
        "ibot",
        "koleo",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "patch_size",
        "grad_norm",
        "images_per_s",
        "teacher_entropy",
        "student_feat_std",
    ):
        assert key in rows[4], key
    assert {rows[s]["patch_size"] for s in rows} <= {8.0, 16.0}
    assert rows[1]["lr"] == 0.0 and rows[3]["lr"] > 0  # warm-up from 0
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert list((run / "tb").glob("events.out.tfevents.*"))
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4 and ck["data_position"] == 4
    assert any(k.startswith("teacher.backbone.") for k in ck["model"])

    # export the teacher backbone; it loads with load_pretrained and equals the checkpoint's teacher
    from openpluto.model import load_pretrained

    assert cli_main(["export", str(run), "--out", str(tmp_path / "model")]) == 0
    model = load_pretrained(tmp_path / "model")
    sd = model.state_dict()
    for k, v in ck["model"].items():
        if k.startswith("teacher.backbone."):
            assert torch.equal(sd[k[len("teacher.backbone.") :]], v)

    # a second run into the same dir without --resume is refused with a one-line error
    assert cli_main(["pretrain", "--config", "cpu-tiny", "--data", str(shards), "--out", str(run)]) == 2


def test_keep_every_keeps_step_checkpoints_and_export_picks_one(shards, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(_cfg(shards, "max_steps=4", "log.checkpoint_every=100", "log.keep_every=2"), run)
    assert kept_steps(run) == [2, 4]
    assert "checkpoints/" in capsys.readouterr().err  # the closing line names the kept folder
    ck2 = torch.load(kept_checkpoint_path(run, 2), weights_only=True)
    ck4 = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck2["step"] == 2 and ck4["step"] == 4
    key = next(k for k in ck2["model"] if k.startswith("teacher.backbone.blocks.0."))
    assert not torch.equal(ck2["model"][key], ck4["model"][key])  # step 2 kept its own bytes

    from openpluto.model import load_pretrained

    assert cli_main(["export", str(run), "--step", "2", "--out", str(tmp_path / "m2")]) == 0
    sd = load_pretrained(tmp_path / "m2").state_dict()
    assert torch.equal(sd[key[len("teacher.backbone."):]], ck2["model"][key])
    capsys.readouterr()
    assert cli_main(["export", str(run), "--step", "3", "--out", str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "step 3" in err and "kept steps: 2, 4" in err
    assert not (tmp_path / "m3").exists()


def test_resume_keeps_the_step_a_kill_left_unkept(shards, tmp_path):
    """A kill between writing a keep-step checkpoint and keeping it: the resumed run keeps it first."""
    run = tmp_path / "run"
    pretrain(_cfg(shards, "max_steps=2", "log.keep_every=2"), run)
    kept_checkpoint_path(run, 2).unlink()  # as if killed before the link
    pretrain(_cfg(shards, "max_steps=4", "log.keep_every=2"), run, resume=True)
    assert kept_steps(run) == [2, 4]
    assert torch.load(kept_checkpoint_path(run, 2), weights_only=True)["step"] == 2


def test_nonfinite_steps_are_skipped_then_stop(shards, tmp_path, monkeypatch):
    from openpluto.ssl import SSLMetaArch

    real = SSLMetaArch.forward
    calls = {"n": 0}

    def flaky(self, batch, *a, **k):
        out = real(self, batch, *a, **k)
        calls["n"] += 1
        if calls["n"] == 1 or calls["n"] >= 3:  # one bad step, a good one, then bad for ever
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(SSLMetaArch, "forward", flaky)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        pretrain(
            _cfg(
                shards,
                "max_steps=20",
                "log.checkpoint_every=1",
                "max_nonfinite_in_row=2",
                "log.tensorboard=false",
            ),
            run,
        )
    rows = _rows(run)
    assert rows[1]["skipped"] == 1 and rows[2]["skipped"] == 1 and rows[3]["skipped"] == 2
    assert 4 not in rows  # the run stopped inside step 4
    ck = load_checkpoint(run / "checkpoint.pt")
    assert ck["step"] == 3 and ck["nonfinite_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def _wait_for(done, proc: subprocess.Popen) -> None:
    """Wait (however long the machine needs) until ``done()``; fail if the process ends first."""
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)


def _wait_for_row(csv: Path, step: int, proc: subprocess.Popen) -> None:
    def logged() -> bool:
        return csv.is_file() and any(line.startswith(f"{step},") for line in csv.read_text().splitlines())

    _wait_for(logged, proc)


# Runs the CLI with the trainer parked for good before step ``STOP`` (after the checkpoint of step
# STOP - 1 was written), so the test kills it at a known point however fast or slow the machine is.
_PARKED_CLI = """
import sys, time, pathlib
import openpluto.train.trainer as trainer
from openpluto.cli.main import main
stop, marker = int(sys.argv[1]), pathlib.Path(sys.argv[2])
real = trainer._forward_backward
def parked(cfg, run, step, *a, **k):
    if step == stop:
        marker.write_text(str(step))
        while True:
            time.sleep(60)
    return real(cfg, run, step, *a, **k)
trainer._forward_backward = parked
sys.exit(main(sys.argv[3:]))
"""


def test_kill9_then_resume_matches_uninterrupted_run(shards, tmp_path):
    extra = ["max_steps=4", "log.checkpoint_every=2", "log.tensorboard=false"]
    ref = tmp_path / "ref"
    pretrain(_cfg(shards, *extra), ref)
    want = _rows(ref)

    run, parked = tmp_path / "killed", tmp_path / "parked"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", _PARKED_CLI, "3", str(parked),
           "pretrain", "--config", "cpu-tiny", "--data", str(shards), "--out", str(run), *TINY, *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(parked.is_file, proc)
    proc.send_signal(signal.SIGKILL)  # mid-run: three steps done, the checkpoint of step 2 on disk
    proc.wait()
    ck = load_checkpoint(run / "checkpoint.pt")
    assert ck["step"] == 2

    summary = pretrain(load_train_config(run / "config.yaml"), run, resume=True)
    assert summary["start_step"] == 2 and summary["steps"] == 4
    got = _rows(run)
    assert sorted(got) == sorted(want)
    for step in want:
        for key in ("total", "dino_local", "dino_global", "ibot", "koleo", "patch_size", "lr", "grad_norm"):
            assert got[step][key] == want[step][key], (step, key)


def test_sigterm_writes_a_checkpoint_and_image_folder_input(tmp_path, monkeypatch):
    from openpluto.ssl import SSLMetaArch

    real = SSLMetaArch.forward
    calls = {"n": 0}

    def forward_then_sigterm(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before preemption
        return real(self, *a, **k)

    monkeypatch.setattr(SSLMetaArch, "forward", forward_then_sigterm)
    data = write_folder(tmp_path / "imgs", 12, size=48)
    run = tmp_path / "run"
    summary = pretrain(_cfg(data, "max_steps=500", "log.checkpoint_every=1000", "log.tensorboard=false"), run)
    assert summary["stopped_by"] == "signal" and summary["steps_done"] == 2
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert (
        cli_main(["pretrain", "--config", "nope", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    )
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "pretrain",
                "--config",
                "cpu-tiny",
                "--data",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "r"),
                "optim.lrr=1",
            ]
        )
        == 2
    )
    assert "optim.lrr" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "pretrain",
                "--config",
                "cpu-tiny",
                "--data",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_presets_load_with_paper_settings():
    s, g = load_train_config("pluto4s"), load_train_config("pluto4g")
    assert (
        s.global_batch_size == 1536
        and s.patch_sizes == (8, 16, 32)
        and s.model_overrides["num_registers"] == 4
    )
    assert g.global_batch_size == 1024 and g.data.batch_size == 32 and g.patch_sizes == (14,)
    assert g.model_overrides["num_registers"] == 4 and g.accum_steps(32) == 1 and g.accum_steps(8) == 4
    assert s.optim.clip_grad == g.optim.clip_grad == 3.0 and s.dist.bucket_cap_mb == 360
    g.ssl.check_patch_sizes(g.patch_sizes)
    s.ssl.check_patch_sizes(s.patch_sizes)


def test_collapse_warning_names_the_symptom_and_the_fix():
    from openpluto.train.metrics import collapse_warning

    k = 256  # ln 256 = 5.55
    assert collapse_warning({"teacher_entropy": 4.2, "student_feat_std": 0.08}, k, 100) is None
    msg = collapse_warning({"teacher_entropy": 5.5, "student_feat_std": 0.08}, k, 100)
    assert "near uniform" in msg and "teacher_temp" in msg and "step 100" in msg
    msg = collapse_warning({"teacher_entropy": 3.0, "student_feat_std": 1e-5}, k, 7)
    assert "collapsed" in msg and "step 7" in msg


def test_hot_teacher_run_warns_once_that_it_cannot_learn(shards, tmp_path, capsys):
    # At teacher temperature 1 the cosine logits give almost uniform targets: the trainer must say so.
    hot = ["schedule.teacher_temp_start=1.0", "schedule.teacher_temp=1.0",
           "schedule.teacher_temp_warmup_steps=1"]
    pretrain(_cfg(shards, "max_steps=4", *hot), tmp_path / "hot")
    err = capsys.readouterr().err
    assert err.count("teacher targets are near uniform") == 1, err
    cold = ["schedule.teacher_temp_start=0.01", "schedule.teacher_temp=0.01",
            "schedule.teacher_temp_warmup_steps=1"]
    pretrain(_cfg(shards, "max_steps=4", *cold), tmp_path / "cold")
    assert "near uniform" not in capsys.readouterr().err


ALL_AUGMENT = "ssl.crops.augment.steps=[flip,rot90,hed,color,grayscale,blur,solarize]"


def test_time_limit_stops_cleanly_and_resume_with_full_augmentation_is_exact(shards, tmp_path, capsys):
    """Every augmentation step on (drawn in workers, applied batched); a run cut by --max-minutes and
    resumed with a loader worker equals an uninterrupted run without workers, step for step."""
    extra = ["max_steps=4", "log.checkpoint_every=100", "log.tensorboard=false", ALL_AUGMENT]
    ref = tmp_path / "ref"
    pretrain(_cfg(shards, *extra), ref)
    want = _rows(ref)

    run = tmp_path / "cut"
    argv = ["pretrain", "--config", "cpu-tiny", "--data", str(shards), "--out", str(run), *TINY, *extra]
    assert cli_main([*argv, "--max-minutes", "1e-6"]) == 0  # a time limit is a clean stop
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "max_minutes" and summary["steps_done"] == 1
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 1
    assert sorted(_rows(run)) == [1] and _rows(run)[1]["lr"] == want[1]["lr"]  # schedules follow max_steps

    resumed = pretrain(load_train_config(run / "config.yaml", ["max_minutes=null", "data.num_workers=1"]),
                       run, resume=True)
    assert resumed["stopped_by"] == "max_steps" and resumed["steps_done"] == 4 and resumed["start_step"] == 1
    got = _rows(run)
    assert sorted(got) == sorted(want)
    for step in want:
        for key in ("total", "dino_local", "dino_global", "ibot", "koleo", "grad_norm", "teacher_entropy"):
            assert got[step][key] == want[step][key], (step, key)

    capsys.readouterr()
    again = pretrain(load_train_config(run / "config.yaml", ["max_minutes=null"]), run, resume=True)
    assert again["steps_done"] == again["start_step"] == 4 and sorted(_rows(run)) == sorted(want)
    err = capsys.readouterr().err
    assert "nothing to do: already at step 4/4" in err and "nan" not in err  # finished, not broken


def test_fewer_images_than_a_batch_is_refused_in_one_line(tmp_path, capsys):
    data = write_folder(tmp_path / "one", 1, size=48)
    run = tmp_path / "run"
    rc = cli_main(["pretrain", "--config", "cpu-tiny", "--data", str(data), "--out", str(run), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(data) in err[0] and "1 image(s), fewer than one batch of 4" in err[0]
    assert "data.batch_size" in err[0]  # the fix
    assert not run.exists()  # nothing created before the input was checked


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_exits_nonzero(shards, tmp_path, sig, code):
    """As a scheduler does: the signal goes to the whole process group (loader workers too); the
    trainer finishes its step, checkpoints and exits 128 + signal, so `pretrain && export` stops."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "openpluto.cli.main", "pretrain", "--config", "cpu-tiny", "--data",
           str(shards), "--out", str(run), *TINY, "max_steps=500", "data.num_workers=1",
           "log.checkpoint_every=1000", "log.tensorboard=false"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_row(run / "metrics.csv", 1, proc)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate()
    assert proc.returncode == code, err[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "signal" and summary["signal"] == int(sig)
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert 1 <= step == summary["steps_done"] < 500
    assert f"stopped by {signal.Signals(sig).name}" in err
