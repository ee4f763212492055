"""``openpluto embed-images``: embed a patch dataset (image folder or CSV) into one HDF5 file."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    import time

    from openpluto import __version__
    from openpluto.embed.images import ImageRecords, embed_images, save_image_features
    from openpluto.eval.data import encoder_info, load_encoder_seeded

    t0 = time.perf_counter()
    records = ImageRecords.from_source(args.source)
    encoder = load_encoder_seeded(args.model, args.device, compile=args.compile)
    enc = encoder_info(encoder, args.model)
    errors: list[tuple[str, str]] = []
    feats, labels, paths, splits = embed_images(
        encoder,
        records,
        args.patch_size,
        args.pooling,
        args.batch_size,
        args.workers,
        args.resize,
        errors=errors,
    )
    kept = records.subset([i for i, p in enumerate(records.paths) if p not in {q for q, _ in errors}])
    save_image_features(
        args.out,
        feats,
        kept,
        {
            "model": enc["name"],
            "model_label": enc["label"],
            "model_spec": args.model,
            "weights_hash": enc["weights_hash"],
            "patch_size": args.patch_size or 0,
            "pooling": args.pooling,
            "resize": args.resize,
            "source": str(args.source),
            "fingerprint": kept.fingerprint(),
            "openpluto_version": __version__,
        },
    )
    if errors:
        from pathlib import Path

        from openpluto.jobs.outputs import error_row, write_errors_csv

        err_path = Path(args.out).with_name(Path(args.out).stem + ".errors.csv")
        write_errors_csv(err_path, [error_row("", p, "embed-images", "error", e) for p, e in errors])
        print(f"skipped {len(errors)} unreadable image(s), listed in {err_path}")
    dt = time.perf_counter() - t0
    print(
        f"embedded {len(feats)} images ({len(kept.classes)} classes) -> {args.out}: features {feats.shape}, "
        f"{len(feats) / dt:.1f} img/s"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``openpluto embed-images``."""
    p = subparsers.add_parser(
        "embed-images",
        help="embed an image folder (ROOT/[split/]<class>/*) or CSV (path,label[,split]) to HDF5",
        description="Resize the shorter side, centre-crop, normalise with the encoder's mean/std and write "
        "features [N,D], labels, paths, splits, classes and settings to one HDF5 file.",
    )
    p.add_argument(
        "source", metavar="FOLDER_OR_CSV", help="ROOT/<class>/*, ROOT/{train,val,test}/<class>/* or CSV"
    )
    p.add_argument(
        "--model",
        required=True,
        help="openpluto model dir, preset name (random init) or timm:NAME:WEIGHTS[:k=v,...]",
    )
    p.add_argument("--out", required=True, help="output FILE.h5")
    p.add_argument("--patch-size", type=int, default=None, help="encoder patch size (default: the model's)")
    p.add_argument("--pooling", choices=["cls", "cls+mean"], default="cls", help="embedding (default: cls)")
    p.add_argument(
        "--resize", type=int, default=224, help="shorter side and centre-crop size in px (default: 224)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder's blocks (GPU speed-up)")
    p.set_defaults(func=_run)
