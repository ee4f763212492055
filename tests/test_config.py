from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from openpluto.config import (
    add_config_args,
    config_from_args,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
)
from openpluto.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.999)


@dataclass
class Cfg:
    name: str = "x"
    depth: int = 2
    mode: Literal["cls", "cls+mean"] = "cls"
    sizes: tuple[int, ...] = (8, 16)
    mpp: float | None = None
    flag: bool = False
    optim: Optim = field(default_factory=Optim)


def test_from_dict_coerces_and_nests():
    cfg = from_dict(Cfg, {"depth": "3", "sizes": "8,32", "optim": {"lr": "2e-4"}, "mpp": "none"})
    assert cfg.depth == 3 and cfg.sizes == (8, 32) and cfg.optim.lr == 2e-4 and cfg.mpp is None


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="optim.lrr"):
        from_dict(Cfg, {"optim": {"lrr": 1}})


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="'depth'"):
        from_dict(Cfg, {"depth": "deep"})
    with pytest.raises(ConfigError, match="'mode'"):
        from_dict(Cfg, {"mode": "max"})


def test_overrides_and_yaml_preset(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("depth: 5\noptim:\n  lr: 0.5\n")
    cfg = load_config(Cfg, str(p), overrides=["optim.lr=0.1", "flag=true"])
    assert cfg.depth == 5 and cfg.optim.lr == 0.1 and cfg.flag is True
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.999]
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["nokey"])


def test_unknown_preset_lists_known(tmp_path):
    (tmp_path / "tiny.yaml").write_text("depth: 1\n")
    assert load_config(Cfg, "tiny", presets_dir=tmp_path).depth == 1
    with pytest.raises(ConfigError, match="tiny"):
        load_config(Cfg, "huge", presets_dir=tmp_path)


def test_argparse_bridge_keeps_defaults_for_unset_flags():
    parser = argparse.ArgumentParser()
    add_config_args(parser, Cfg)
    cfg = config_from_args(Cfg, parser.parse_args(["--sizes", "8", "32", "--flag", "--mode", "cls+mean"]))
    assert cfg.sizes == (8, 32) and cfg.flag and cfg.mode == "cls+mean" and cfg.depth == 2


def test_atomic_path_renames_only_on_success_with_normal_permissions(tmp_path):
    import os

    from openpluto.io import atomic_path

    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())
    with atomic_path(target) as tmp:
        tmp.write_text("done")
    assert target.read_text() == "done"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
