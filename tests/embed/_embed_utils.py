"""Settings shared by the embed tests (kept tiny: 2 cores, <= 120 s)."""

from __future__ import annotations

# 1280 px at 0.5 µm/px read at 1 µm/px with 64 px tiles: 128 level-0 px per tile, up to 100 tiles.
SLIDE_SIZE = 1280
SLIDE_MPP = 0.5
TILE = 64
MPP = 1.0
MODEL = "vit_micro_flexi"


def embed_config(inputs, out, **kw):
    from openpluto.embed import EmbedConfig

    base = dict(inputs=[str(p) for p in inputs], model=MODEL, out=str(out), mpp=MPP, tile_size=TILE,
                batch_size=16, workers=1, min_tissue=0.5, pictures=False, threads=1)
    base.update(kw)
    cfg = EmbedConfig(**base)
    cfg.validate()
    return cfg
