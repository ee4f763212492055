"""``openpluto pretrain --compile``: per-step patch sizes 8/16/32 compile each block shape once (teacher
globals, student globals, student locals per patch size) and a resumed run compiles nothing new."""

from __future__ import annotations

import yaml
from torch._dynamo.utils import counters
from train_helpers import write_folder

from openpluto.cli.main import main as cli_main
from openpluto.train.patch_sizes import patch_size_for_step

TINY = [
    "model_overrides.depth=1",
    "model_overrides.embed_dim=32",
    "model_overrides.num_heads=2",
    "ssl.crops.n_local=3",  # 6 local vs 4 global crops: the two never share a shape
    "ssl.crops.augment.steps=[flip]",
    "ssl.heads.out_dim=64",
    "ssl.heads.hidden_dim=32",
    "ssl.heads.bottleneck_dim=16",
    "patch_sizes=[8,16,32]",  # three patch sizes, whatever cpu-tiny draws
    "patch_size_probs=null",
    "data.batch_size=2",
    "data.num_workers=0",
    "log.progress=false",
    "log.tensorboard=false",
]


def _first_steps_covering(sizes=(8, 16, 32), seed: int = 0) -> int:
    seen, step = set(), 0
    while seen != set(sizes):
        seen.add(patch_size_for_step(step, sizes, None, seed))
        step += 1
    return step


def test_compiled_pretraining_compiles_three_shapes_per_patch_size_then_nothing(
        tmp_path, monkeypatch, fresh_dynamo):
    monkeypatch.setenv("OPENPLUTO_COMPILE_BACKEND", "aot_eager")  # same graphs as inductor, no codegen
    data = write_folder(tmp_path / "tiles", 8, size=64)
    run = tmp_path / "run"
    warm = _first_steps_covering()
    argv = ["pretrain", "--config", "cpu-tiny", "--data", str(data), "--out", str(run), "--compile"]
    assert cli_main([*argv, "--max-steps", str(warm), *TINY]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["compile"] is True
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3 * 3, dict(counters["stats"])  # {teacher, student global, student local} x 8/16/32
    assert cli_main(["pretrain", "--out", str(run), "--resume", "--max-steps", str(warm + 4)]) == 0
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation after warm-up
