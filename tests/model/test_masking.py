"""iBOT masking: masked patch tokens are the mask token when they enter the blocks."""

from __future__ import annotations

import pytest
import torch

from openpluto.errors import OpenPlutoError


def _block_input(model, x, patch_size, masks):
    seen = {}
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    try:
        with torch.no_grad():
            model.forward_features(x, patch_size=patch_size, masks=masks)
    finally:
        handle.remove()
    return seen["x"]


@pytest.mark.parametrize("patch_size", [8, 16])
def test_masked_tokens_equal_mask_token_before_blocks(micro, patch_size):
    x = torch.randn(2, 3, 64, 64)
    n = (64 // patch_size) ** 2
    masks = torch.rand(2, n) < 0.4
    masks[0, 0] = True
    masks[1, 0] = False
    r = micro.num_prefix_tokens
    got = _block_input(micro, x, patch_size, masks)[:, r:]
    clean = _block_input(micro, x, patch_size, None)[:, r:]
    mask_token = micro.mask_token.reshape(-1)
    assert torch.equal(got[masks], mask_token.expand(int(masks.sum()), -1))
    assert torch.equal(got[~masks], clean[~masks])
    assert not torch.allclose(clean[masks], mask_token.expand(int(masks.sum()), -1))


def test_masking_with_learned_positions_keeps_the_position(micro_learned):
    model = micro_learned
    x = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[:, ::3] = True
    r = model.num_prefix_tokens
    got = _block_input(model, x, 8, masks)[:, r:]
    pos = model.pos_embed[0]  # reference grid 64/16 = 4x4 -> resampled to 8x8 at patch 8
    from timm.layers import resample_abs_pos_embed

    pos = resample_abs_pos_embed(model.pos_embed, new_size=[8, 8], old_size=[4, 4], num_prefix_tokens=0)[0]
    expected = (model.mask_token.reshape(1, -1) + pos).unsqueeze(0).expand(2, -1, -1)
    torch.testing.assert_close(got[masks], expected[masks])


def test_masks_change_the_output_and_bad_shape_is_an_error(micro):
    x = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    with torch.no_grad():
        a = micro.forward_features(x, 8, masks)["cls"]
        masks[0, 3] = True
        b = micro.forward_features(x, 8, masks)["cls"]
    assert not torch.allclose(a, b)
    with pytest.raises(OpenPlutoError, match="masks have shape"):
        micro.forward_features(x, 8, torch.zeros(1, 15, dtype=torch.bool))
