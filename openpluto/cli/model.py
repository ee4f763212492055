"""``openpluto export-timm MODEL_DIR --patch-size P --out DIR``: an openpluto model as a timm checkpoint."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export-timm`` sub-command."""
    p = subparsers.add_parser(
        "export-timm",
        help="write a model directory as a timm checkpoint (DINOv3/DINOv2-style ViT) at one patch size",
        description="Write MODEL_DIR (config.json + model.safetensors) as a checkpoint that timm's own "
        "ViT loads (Eva 'vit_*_dinov3' for RoPE models, VisionTransformer 'vit_*_reg4_dinov2' for "
        "learned positions), at one patch size. OUT gets model.safetensors, config.json (for "
        "timm.create_model('local-dir:OUT')), timm_model.json and a README.md with the exact call.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="openpluto model directory (`openpluto export`)")
    p.add_argument("--patch-size", type=int, default=None, help="patch size in px (default: the model's)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="load the export in timm and compare outputs on a random image (default: on)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from openpluto.errors import OpenPlutoError
    from openpluto.model import load_pretrained
    from openpluto.model.timm_export import create_timm_model, export_timm

    model = load_pretrained(args.model_dir)
    p = model.default_patch_size if args.patch_size is None else args.patch_size
    if p not in model.patch_sizes:
        raise OpenPlutoError(f"--patch-size {p} is not one of the patch sizes of {args.model_dir} "
                             f"({', '.join(map(str, model.patch_sizes))})")
    out = export_timm(model, p, args.out)
    print(f"wrote {out}/model.safetensors (+ timm_model.json, README.md) for patch size {p}")
    if args.verify:
        tm = create_timm_model(out)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size, generator=g)
        with torch.no_grad():
            ours, _ = model.forward_tokens(x, p)
            theirs = tm.forward_features(x)
        diff = (ours - theirs).abs().max().item()
        print(f"verified: timm {type(tm).__name__} vs openpluto at patch {p}, "
              f"{model.cfg.img_size}px: max abs difference {diff:.2e}")
        if not diff <= 1e-4:
            raise OpenPlutoError(f"export in {out} does not match openpluto (max abs difference {diff:.2e})")
    print(f"load it with: see {out}/README.md")
    return 0
