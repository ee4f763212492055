"""save_pretrained -> load_pretrained is exact; loading is strict and errors name the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from openpluto.errors import OpenPlutoError
from openpluto.model import load_pretrained, read_config, save_pretrained


@pytest.mark.parametrize("which", ["micro", "micro_learned"])
def test_save_load_forward_identical(which, request, tmp_path):
    model = request.getfixturevalue(which)
    save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format"] == "openpluto-vit" and meta["model"]["embed_dim"] == 128
    loaded = load_pretrained(tmp_path / "m")
    assert not loaded.training and loaded.cfg == model.cfg
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        for p in model.patch_sizes:
            a, b = model.forward_features(x, p), loaded.forward_features(x, p)
            assert torch.equal(a["patch"], b["patch"]) and torch.equal(a["cls"], b["cls"])
            assert torch.equal(a["registers"], b["registers"])
    assert read_config(tmp_path / "m") == model.cfg


def test_missing_and_unexpected_keys_are_refused_by_name(micro, tmp_path):
    d = tmp_path / "m"
    save_pretrained(micro, d)
    state = load_file(str(d / "model.safetensors"))
    state.pop("blocks.1.attn.proj.weight")
    state["blocks.9.extra"] = torch.zeros(1)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(OpenPlutoError) as e:
        load_pretrained(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg
    assert "missing keys: blocks.1.attn.proj.weight" in msg and "unexpected keys: blocks.9.extra" in msg


def test_wrong_shape_is_refused(micro, tmp_path):
    d = tmp_path / "m"
    save_pretrained(micro, d)
    state = load_file(str(d / "model.safetensors"))
    state["cls_token"] = torch.zeros(1, 1, 64)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(OpenPlutoError, match="cls_token"):
        load_pretrained(d)


def test_missing_dir_file_and_bad_config(micro, tmp_path):
    with pytest.raises(OpenPlutoError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OpenPlutoError, match="config.json is missing"):
        load_pretrained(tmp_path / "empty")
    d = tmp_path / "m"
    save_pretrained(micro, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(OpenPlutoError, match="model.safetensors is missing"):
        load_pretrained(d)
    save_pretrained(micro, d)
    meta = json.loads((d / "config.json").read_text())
    meta["model"]["depthh"] = 3
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(OpenPlutoError, match="depthh"):
        load_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(OpenPlutoError, match="not valid JSON"):
        load_pretrained(d)
