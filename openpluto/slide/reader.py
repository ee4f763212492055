"""Whole-slide reader: OpenSlide first, tiffslide for TIFFs OpenSlide refuses; reads at a target µm/px.

Coordinates are always level-0 pixels. ``Slide.read(x, y, size, mpp)`` reads from the coarsest
pyramid level that is still at least as fine as ``mpp`` and resizes (antialiased) to the exact size.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from openpluto.errors import OpenPlutoError

# A target at most this much finer than the scan (e.g. 0.25 µm/px on a 0.2525 scan) is read from
# level 0 with a tiny upsampling instead of being refused.
UPSAMPLE_TOLERANCE = 1.10
# Level choice: a level counts as "at least as fine" as the target if its downsample is within this
# relative slack (openslide reports 4.016 for a nominal 4x level).
LEVEL_SLACK = 1.02
# Resampling filter of ``Slide.read``: PIL filters are antialiased when downscaling (support grows
# with the factor); bilinear (triangle) is ~2x faster than Lanczos at the ~0.9x factors of real scans.
RESAMPLE = Image.Resampling.BILINEAR
# Thumbnails of levels larger than this (level px per side) are built chunk by chunk.
_CHUNK = 4096
# Header sanity: a single-file slide must hold at least one byte per this many level-0 pixels. Real
# scans hold 1 byte per 3-300 px (JPEG of tissue and of blank glass); a header claiming far more
# pixels than the file can hold is corrupt and would make a whole-slide read run for hours.
MAX_PIXELS_PER_BYTE = 10_000
# Formats whose pixels live in other files (MRXS/VMS data folders, DICOM series): not size-checked.
_MULTI_FILE = (".mrxs", ".vms", ".vmu", ".dcm")


class SlideError(OpenPlutoError):
    """A slide that cannot be opened or read; the message names the file."""


def _clean(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _lib_error(e: BaseException, path: Path) -> str:
    """A library's one-line message without the file name it repeats (the caller names the file once)."""
    msg = _clean(e)
    for name in (str(path), path.name):
        msg = msg.replace(f"Reading {name}: ", "").replace(f"{name}: ", "").replace(name, "the file")
    return msg


def _parse_mpp(props: dict, keys: tuple[str, ...]) -> float | None:
    for k in keys:
        v = props.get(k)
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f) and f > 0:
            return f
    return None


class Slide:
    """An opened whole-slide image.

    Attributes: ``path``, ``name`` (file stem), ``dimensions`` (w, h at level 0), ``level_count``,
    ``level_dimensions``, ``level_downsamples``, ``mpp`` (µm/px at level 0, or None when unknown and
    not required), ``mpp_source`` ("metadata" | "override" | None), ``backend`` ("openslide" |
    "tiffslide"), ``vendor``.
    """

    def __init__(self, path: Path, handle, backend: str, mpp: float | None, mpp_source: str | None):
        self.path = Path(path)
        self.name = self.path.stem
        self._h = handle
        self.backend = backend
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.dimensions: tuple[int, int] = tuple(int(v) for v in handle.dimensions)  # type: ignore[assignment]
        self.level_count: int = int(handle.level_count)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in handle.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
        props = read_properties(handle, self.path)
        vendor = props.get("openslide.vendor") or props.get("tiffslide.vendor")
        self.vendor = vendor if isinstance(vendor, str) and vendor else backend
        self.properties = props

    # ------------------------------------------------------------------ context manager
    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._h.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.name!r}, {self.dimensions[0]}x{self.dimensions[1]}, levels={self.level_count}, "
            f"mpp={self.mpp}, backend={self.backend})"
        )

    # ------------------------------------------------------------------ level choice
    def require_mpp(self) -> float:
        if self.mpp is None:
            raise SlideError(
                f"{self.path}: no µm/px in the slide metadata; pass --mpp-override VALUE "
                "(or a CSV with columns slide,mpp)"
            )
        return self.mpp

    def best_level(self, downsample: float) -> int:
        """Coarsest level whose downsample is <= ``downsample`` (level-0 px per output px)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * LEVEL_SLACK and d >= self.level_downsamples[best]:
                best = i
        return best

    def level_for_mpp(self, mpp: float, allow_upsample: bool = False) -> int:
        """Pyramid level that ``read`` uses for ``mpp`` (raises SlideError when it would upsample)."""
        return self.best_level(self._target_downsample(mpp, allow_upsample))

    def _target_downsample(self, mpp: float, allow_upsample: bool) -> float:
        base = self.require_mpp()
        if mpp <= 0 or not math.isfinite(mpp):
            raise SlideError(f"{self.path}: target µm/px must be positive, got {mpp}")
        f = mpp / base
        if f * UPSAMPLE_TOLERANCE < 1.0 and not allow_upsample:
            raise SlideError(
                f"{self.path}: target {mpp:g} µm/px is finer than the scan ({base:.4g} µm/px); "
                "drop that --mpp for this slide or pass --allow-upsample"
            )
        return f

    # ------------------------------------------------------------------ reading
    def _read_image(self, level: int, x: int, y: int, w: int, h: int) -> Image.Image:
        """RGB PIL image of a region at ``level`` (x, y in level-0 px); no-data (transparent) is white."""
        try:
            if self.backend == "openslide":
                img = self._h.read_region((int(x), int(y)), int(level), (int(w), int(h)))
            else:
                arr = self._h.read_region((int(x), int(y)), int(level), (int(w), int(h)), as_array=True)
                arr = np.asarray(arr)
                if arr.dtype != np.uint8:
                    arr = np.clip(arr, 0, 255).astype(np.uint8)
                if arr.ndim == 2:
                    arr = np.repeat(arr[:, :, None], 3, axis=2)
                img = Image.fromarray(np.ascontiguousarray(arr[:, :, : min(4, arr.shape[2])]))
        except OpenPlutoError:
            raise
        except Exception as e:
            msg = f"{self.path}: reading level {level} at ({x}, {y}) failed: {_clean(e)}"
            raise SlideError(msg) from None
        if img.mode == "RGBA":
            alpha = img.getchannel("A")
            if alpha.getextrema()[0] < 255:
                white = Image.new("RGB", img.size, (255, 255, 255))
                white.paste(img.convert("RGB"), mask=alpha)
                return white
            return img.convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Raw RGB uint8 [h, w, 3] of a region at ``level`` (x, y in level-0 px); no-data is white."""
        return np.asarray(self._read_image(level, x, y, w, h))

    def read(
        self, x: float, y: float, size: int | tuple[int, int], mpp: float, allow_upsample: bool = False
    ) -> np.ndarray:
        """RGB uint8 [H, W, 3] of the region whose level-0 top-left is (x, y), ``size`` px at ``mpp``.

        ``size`` is an int or (w, h) in pixels at the target µm/px. Reads from the coarsest level at
        least as fine as ``mpp``, then resizes with PIL's antialiasing (area-weighted) filter.
        """
        return np.asarray(self.read_image(x, y, size, mpp, allow_upsample))

    def read_image(
        self, x: float, y: float, size: int | tuple[int, int], mpp: float, allow_upsample: bool = False
    ) -> Image.Image:
        """``read`` as an RGB PIL image (saves a copy when the next step is JPEG encoding)."""
        out_w, out_h = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
        f = self._target_downsample(mpp, allow_upsample)
        level = self.best_level(f)
        ds = self.level_downsamples[level]
        scale = f / ds  # level px per output px (>= ~1 unless upsampling)
        w_l, h_l = out_w * scale, out_h * scale
        rw, rh = max(1, math.ceil(w_l - 1e-6)), max(1, math.ceil(h_l - 1e-6))
        img = self._read_image(level, int(round(x)), int(round(y)), rw, rh)
        if (rw, rh) != (out_w, out_h):
            img = img.resize((out_w, out_h), RESAMPLE, box=(0, 0, w_l, h_l))
        return img

    def thumbnail(self, max_size: int = 1024, downsample: float | None = None) -> tuple[np.ndarray, float]:
        """Whole-slide RGB thumbnail and its downsample (level-0 px per thumbnail px).

        The long side is at most ``max_size`` unless ``downsample`` is given. Large levels are read in
        chunks, so memory stays bounded by the thumbnail size, not the slide size.
        """
        w0, h0 = self.dimensions
        if downsample is None:
            downsample = max(w0, h0) / float(max_size)
        downsample = max(float(downsample), 1.0)
        tw, th = max(1, int(round(w0 / downsample))), max(1, int(round(h0 / downsample)))
        level = self.best_level(downsample)
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        out = np.full((th, tw, 3), 255, np.uint8)
        step = _CHUNK
        for ly in range(0, lh, step):
            for lx in range(0, lw, step):
                cw, ch = min(step, lw - lx), min(step, lh - ly)
                chunk = self._read_image(level, int(lx * ds), int(ly * ds), cw, ch)
                # Target pixel range covered by this chunk.
                s = ds / downsample
                tx0, ty0 = int(round(lx * s)), int(round(ly * s))
                tx1, ty1 = min(tw, int(round((lx + cw) * s))), min(th, int(round((ly + ch) * s)))
                if tx1 <= tx0 or ty1 <= ty0:
                    continue
                box = ((tx0 / s) - lx, (ty0 / s) - ly, (tx1 / s) - lx, (ty1 / s) - ly)
                box = (max(0.0, box[0]), max(0.0, box[1]), min(cw, box[2]), min(ch, box[3]))
                img = chunk.resize((tx1 - tx0, ty1 - ty0), Image.Resampling.BOX, box=box)
                out[ty0:ty1, tx0:tx1] = np.asarray(img)
        return out, w0 / tw


def read_properties(handle, path: Path) -> dict:
    """The handle's metadata; a property that cannot be read (bit rot) is a one-line SlideError."""
    out = {}
    for key in list(handle.properties):
        try:
            out[key] = handle.properties[key]
        except KeyError:
            raise SlideError(
                f"{path}: the slide metadata is corrupt (property {key!r} cannot be read); the file is "
                "damaged: copy it again from the scanner or re-export it"
            ) from None
    return out


def check_header(path: Path, dimensions: tuple[int, int], file_size: int | None = None) -> None:
    """Refuse a single-file slide whose header claims more level-0 pixels than the file can hold."""
    if path.suffix.lower() in _MULTI_FILE:
        return
    w, h = dimensions
    size = path.stat().st_size if file_size is None else file_size
    if w <= 0 or h <= 0:
        raise SlideError(f"{path}: the header gives an empty image ({w} x {h} px); the file is damaged")
    if w * h > max(size, 1) * MAX_PIXELS_PER_BYTE:
        raise SlideError(
            f"{path}: the header claims {w} x {h} px but the file holds only {size:,} bytes; the header is "
            "corrupt or the file truncated: copy it again or re-export it"
        )


def _metadata_mpp(props: dict) -> float | None:
    mpp = _parse_mpp(props, ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP"))
    return mpp


def open_slide(path: str | os.PathLike, mpp_override: float | None = None, require_mpp: bool = True) -> Slide:
    """Open a whole-slide image (OpenSlide, falling back to tiffslide for TIFFs OpenSlide refuses).

    µm/px comes from the metadata, else ``mpp_override``; with neither, ``require_mpp`` raises a
    one-line SlideError naming the file (``require_mpp=False`` leaves ``slide.mpp`` as None).
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a folder, not a slide file")
    errors: list[str] = []
    handle, backend = None, None
    try:
        import openslide

        handle, backend = openslide.OpenSlide(str(path)), "openslide"
    except Exception as e:
        errors.append(f"openslide: {_lib_error(e, path)}")
    if handle is None and path.suffix.lower() in (".tif", ".tiff", ".svs", ".btf", ".ome.tif", ".qptiff"):
        try:
            import tiffslide

            handle, backend = tiffslide.TiffSlide(str(path)), "tiffslide"
            _ = handle.level_dimensions
        except Exception as e:
            handle = None
            errors.append(f"tiffslide: {_lib_error(e, path)}")
    if handle is None:
        raise SlideError(f"{path}: cannot open as a slide ({'; '.join(errors)})")
    try:
        check_header(path, tuple(int(v) for v in handle.dimensions))
        mpp, source = _choose_mpp(path, read_properties(handle, path), mpp_override, require_mpp)
        return Slide(path, handle, backend, mpp, source)
    except OpenPlutoError:
        handle.close()
        raise
    except Exception as e:
        handle.close()
        raise SlideError(f"{path}: unreadable header ({_lib_error(e, path)}); the file is damaged") from None


def _choose_mpp(
    path: Path, props: dict, mpp_override: float | None, require_mpp: bool
) -> tuple[float | None, str | None]:
    """(µm/px, source): the metadata's, else the override; a one-line SlideError if required and absent."""
    mpp = _metadata_mpp(props)
    if mpp is not None:
        return mpp, "metadata"
    if mpp_override is not None:
        if not (mpp_override > 0 and math.isfinite(mpp_override)):
            raise SlideError(f"{path}: --mpp-override must be a positive number, got {mpp_override}")
        return float(mpp_override), "override"
    if require_mpp:
        raise SlideError(
            f"{path}: no µm/px in the slide metadata; pass --mpp-override VALUE "
            "(or a CSV with columns slide,mpp)"
        )
    return None, None
