"""Raw JPEG tiles of tiled-TIFF pyramids (Aperio SVS, generic TIFF, Hamamatsu NDPI), decoded directly.

tifffile gives each pyramid level's geometry and the file offsets of its JPEG tiles (NDPI: the
restart-marker strips tifffile exposes as tiles, with the header it rebuilds); the bytes are read
with ``os.pread`` and decoded by Pillow's libjpeg-turbo, optionally with DCT-domain downscaling
(``Image.draft``: the IDCT itself outputs 1/2, 1/4 or 1/8 of the pixels, so a level decoded at 1/4
costs far less than decoding it fully and resizing). Each tile becomes a self-contained JPEG stream:

- shared ``JPEGTables`` (SVS) are spliced in front of the tile's scan (SOI of the tables, tile
  without its SOI);
- JPEG data whose TIFF photometric is RGB (Aperio) gets an Adobe APP14 marker with transform 0, so
  every decoder (Pillow, torchvision on CPU or GPU) reads the components as RGB, not YCbCr -- the
  rule tifffile and libtiff apply; photometric YCbCr is left to the decoder's default (YCbCr -> RGB).

Everything else (JPEG 2000, LZW, DICOM, MRXS, ...) is not handled here: ``open_jpeg_pyramid``
returns None and the caller reads through OpenSlide.
"""

from __future__ import annotations

import io
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

JPEG = 7  # TIFF compression tag value of "new-style" JPEG
SCALES = (1, 2, 4, 8)  # DCT-domain scalings libjpeg offers
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6
# Adobe APP14, version 100, no flags, transform 0 = the components are R, G, B (no colour transform).
ADOBE_RGB = b"\xff\xee" + struct.pack(">H", 14) + b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0)
SOI, EOI = b"\xff\xd8", b"\xff\xd9"


@dataclass(frozen=True)
class JpegLevel:
    """One JPEG-compressed pyramid level: ``width`` x ``height`` px cut in ``tile_w`` x ``tile_h`` tiles.

    ``downsample`` is level-0 px per level px (mean of x and y, OpenSlide's convention); tile ``i``
    (row-major) is ``counts[i]`` bytes at ``offsets[i]``; its stream is ``head + data[skip:] + tail``.
    """

    index: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    downsample: float
    offsets: np.ndarray
    counts: np.ndarray
    head: bytes
    skip: int
    tail: bytes

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_h)


def _stream_parts(page, first_tile: bytes) -> tuple[bytes, int, bytes]:
    """(head, skip, tail) that turn a tile of ``page`` into a self-contained JPEG stream."""
    header = getattr(page, "jpegheader", None)  # NDPI: SOI..SOS for one restart interval
    tables = page.jpegtables
    if header is not None:
        head, skip, tail = bytes(header), 0, EOI
    elif tables is not None:
        head, skip, tail = bytes(tables)[:-2], 2, b""  # tables' SOI + DQT/DHT, then the tile after its SOI
    else:
        head, skip, tail = SOI, 2, b""
    jfif = b"JFIF" in (head[:64] + first_tile[:64])
    if int(page.photometric) == _PHOTOMETRIC_RGB and not jfif:
        head = SOI + ADOBE_RGB + head[2:]
    return head, skip, tail


def _page_ok(page) -> bool:
    return (
        int(page.compression) == JPEG
        and page.is_tiled
        and int(page.photometric) in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR)
        and int(page.samplesperpixel) == 3
        and int(page.bitspersample) == 8
        and int(page.planarconfig) == 1
        and not page.extrasamples
    )


class JpegPyramid:
    """The JPEG levels of one tiled TIFF, read by file offset; ``levels[0]`` is full resolution."""

    def __init__(self, path: Path, levels: list[JpegLevel], cache_mb: float = 32.0):
        self.path = Path(path)
        self.levels = levels
        self._fd = os.open(self.path, os.O_RDONLY)
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_mb * 2**20)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._cache.clear()

    # ------------------------------------------------------------------ one tile
    def stream(self, level: JpegLevel, i: int) -> bytes | None:
        """Self-contained JPEG stream of tile ``i`` (None for a tile the file does not store)."""
        n = int(level.counts[i])
        if n == 0:
            return None
        data = os.pread(self._fd, n, int(level.offsets[i]))
        if len(data) != n:
            raise OSError(f"short read of tile {i} (file truncated?)")
        return level.head + data[level.skip:] + level.tail

    def tile(self, level: JpegLevel, i: int, scale: int) -> np.ndarray | None:
        """RGB uint8 [tile_h / scale, tile_w / scale (rounded up), 3] of tile ``i`` (cached); None: absent."""
        key = (level.index, scale, i)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        data = self.stream(level, i)
        if data is None:
            return None
        arr = decode_jpeg(data, scale)
        want = (-(-level.tile_h // scale), -(-level.tile_w // scale))
        if arr.shape[:2] != want:
            raise ValueError(f"tile {i} of level {level.index} decodes to {arr.shape[:2]}, expected {want}")
        self._cache[key] = arr
        self._cache_bytes += arr.nbytes
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return arr

    # ------------------------------------------------------------------ regions
    def region(self, level: JpegLevel, scale: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 [h, w, 3] of ``level`` decoded at 1/``scale``, (x, y) in scaled px; outside is white."""
        out = np.full((h, w, 3), 255, np.uint8)
        tw, th = -(-level.tile_w // scale), -(-level.tile_h // scale)  # scaled tile pitch
        lw, lh = -(-level.width // scale), -(-level.height // scale)  # scaled level size
        x0, y0, x1, y1 = max(0, x), max(0, y), min(lw, x + w), min(lh, y + h)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                arr = self.tile(level, ty * level.tiles_across + tx, scale)
                if arr is None:
                    continue
                ax0, ay0 = max(x0, tx * tw), max(y0, ty * th)
                ax1, ay1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                ox, oy = tx * tw, ty * th
                out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = arr[ay0 - oy:ay1 - oy, ax0 - ox:ax1 - ox]
        return out


def decode_jpeg(data: bytes, scale: int = 1) -> np.ndarray:
    """RGB uint8 [h / scale, w / scale (rounded up), 3] of a JPEG stream; ``scale``: 1, 2, 4 or 8 (DCT)."""
    im = Image.open(io.BytesIO(data), formats=("JPEG",))
    if scale > 1:
        w, h = im.size
        im.draft("RGB", (max(1, w // scale), max(1, h // scale)))
    im.load()
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def open_jpeg_pyramid(path: str | os.PathLike, level0: tuple[int, int], cache_mb: float = 32.0
                      ) -> JpegPyramid | None:
    """The JPEG pyramid of a tiled TIFF whose full-resolution level is ``level0`` (w, h), else None.

    None when the file is not a TIFF tifffile can parse, its main series is not entirely 8-bit RGB
    JPEG tiles (JPEG 2000 SVS, LZW, ...), or its first level does not have the expected size.
    """
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                return None
            pages = [lv.keyframe for lv in tif.series[0].levels]
            if not pages or not all(_page_ok(p) for p in pages):
                return None
            w0, h0 = int(pages[0].imagewidth), int(pages[0].imagelength)
            if (w0, h0) != tuple(level0):
                return None
            levels = []
            for i, p in enumerate(pages):
                offsets = np.asarray(p.dataoffsets, np.int64)
                counts = np.asarray(p.databytecounts, np.int64)
                w, h = int(p.imagewidth), int(p.imagelength)
                tw, th = int(p.tilewidth), int(p.tilelength)
                if len(offsets) != -(-w // tw) * -(-h // th):
                    return None
                first = next((j for j in range(len(counts)) if counts[j] > 0), None)
                if first is None:
                    return None
                tif.filehandle.seek(int(offsets[first]))
                head, skip, tail = _stream_parts(p, tif.filehandle.read(min(64, int(counts[first]))))
                ds = (w0 / w + h0 / h) / 2.0
                levels.append(JpegLevel(i, w, h, tw, th, ds, offsets, counts, head, skip, tail))
    except Exception:  # noqa: BLE001 - anything tifffile cannot parse is read by OpenSlide instead
        return None
    return JpegPyramid(Path(path), levels, cache_mb=cache_mb)


def best_source(downsamples: list[float], target: float, slack: float, dct: bool) -> tuple[int, int]:
    """(level, scale) whose effective downsample ``downsamples[level] * scale`` is the coarsest <= target.

    ``target`` is level-0 px per output px; ``slack`` the relative tolerance of "at least as fine".
    Within 1% of the coarsest, the smallest DCT scale wins (a stored level beats a scaled decode of a
    finer one: it decodes fewer bytes and is what OpenSlide reads).
    """
    cands = [(ds * s, s, lv) for lv, ds in enumerate(downsamples) for s in (SCALES if dct else (1,))
             if ds * s <= target * slack]
    if not cands:
        return 0, 1
    top = max(c[0] for c in cands)
    _, s, lv = min((c for c in cands if c[0] >= top / 1.01), key=lambda c: (c[1], -c[0]))
    return lv, s


def write_jpeg_pyramid(path: str | os.PathLike, level0: np.ndarray, mpp: float, downsamples=(1,),
                       tile: int = 256, quality: int = 90, rgb_jpeg: bool = False) -> Path:
    """Write RGB uint8 ``level0`` [H, W, 3] as a JPEG-tiled TIFF with exactly these integer level downsamples.

    For tests and benchmarks: e.g. ``downsamples=(1, 16)`` is a 0.25 µm/px scan whose next level is
    4 µm/px. ``rgb_jpeg`` stores the JPEG data as RGB with photometric RGB (as Aperio does) instead
    of YCbCr. Resolution tags carry ``mpp`` (OpenSlide's generic-tiff reader picks them up).
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = {"level": quality, **({"outcolorspace": "RGB"} if rgb_jpeg else {})}
    res = 1e4 / mpp  # px per cm
    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp) as tw:
        for i, ds in enumerate(downsamples):
            img = level0 if ds == 1 else np.asarray(Image.fromarray(level0).reduce(int(ds)))
            tw.write(img, tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs=args,
                     resolution=(res / ds, res / ds), resolutionunit="CENTIMETER", metadata=None,
                     subfiletype=1 if i else 0)
    os.replace(tmp, path)
    return path
