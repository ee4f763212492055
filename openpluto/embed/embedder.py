"""The model side of ``openpluto embed``: uint8 tile batches -> embeddings, with the device kept busy.

``BatchPacker`` packs the readers' tiles into batches held in (pinned, on CUDA) host buffers;
``TileEmbedder.submit`` sends a batch as uint8 with a non-blocking copy, normalises it on the
device, runs the encoder under ``torch.inference_mode`` (bf16 autocast on GPU) and starts the copy
of the features back, returning before the GPU is done; ``Timings`` adds up where the time goes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Timings:
    """Seconds of the main process per stage (GPU stages measured with CUDA events)."""

    wait: float = 0.0  # waiting for the readers
    pack: float = 0.0  # copying tiles into batch buffers
    h2d: float = 0.0  # host -> device and normalisation
    model: float = 0.0  # the encoder
    write: float = 0.0  # device -> host, h5 rows and pictures
    tiles: int = 0

    def add(self, other: Timings) -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


class _Clock:
    """Stage timer: ``perf_counter`` on CPU; on CUDA, events read back once at the end (no syncs)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def add(self, name: str, start: Any, end: Any) -> None:
        self.spans.append((name, start, end))

    def settle(self, into: Timings) -> None:
        """Add the finished spans to ``into`` (on CUDA: waits for them)."""
        if self.cuda and self.spans:
            self.spans[-1][2].synchronize()
        for name, a, b in self.spans:
            dt = a.elapsed_time(b) / 1000.0 if self.cuda else b - a
            setattr(into, name, getattr(into, name) + dt)
        self.spans.clear()


class PendingEmbedding:
    """Features of a submitted batch; ``result()`` waits for them (float32 numpy, on the host)."""

    def __init__(self, feats: torch.Tensor, tokens: torch.Tensor | None, done: Any):
        self._feats, self._tokens, self._done = feats, tokens, done

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._done is not None:
            self._done.synchronize()
        tokens = None if self._tokens is None else self._tokens.numpy()
        return self._feats.numpy(), tokens


class TileEmbedder:
    """uint8 RGB tiles [B, 3, T, T] or [B, T, T, 3] -> tile embeddings [B, D] (and patch tokens [B, h*w, D]).

    The uint8 batch goes to ``device`` as is (non-blocking from pinned memory) and is normalised
    there with the encoder's mean/std (0..1 RGB); runs under ``torch.inference_mode`` and, for
    ``dtype="bf16"``, autocast; outputs are float32 (tokens float16) on the CPU. ``submit`` returns
    before a GPU has finished (``PendingEmbedding.result()`` waits); calling the embedder waits.
    """

    def __init__(self, encoder: Any, device: torch.device, patch_size: int | None, pooling: str,
                 dtype: str = "fp32", tokens: bool = False):
        self.encoder = encoder
        self.device = device
        self.patch_size = patch_size
        self.pooling = pooling
        self.tokens = tokens
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
        self.mean = torch.tensor(encoder.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(encoder.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * self.std)
        self._shift = self.mean / self.std
        self.grid: tuple[int, int] | None = None
        self.clock = _Clock(device)

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 [B, 3, T, T] on the device from uint8 [B, 3, T, T] or [B, T, T, 3] anywhere."""
        x = batch.to(self.device, non_blocking=True)
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device)
        out.copy_(x)  # uint8 -> float32, channels first, in one pass
        return out.mul_(self._scale).sub_(self._shift)  # (x / 255 - mean) / std

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t.cpu()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)

    @torch.inference_mode()
    def submit(self, batch: torch.Tensor) -> PendingEmbedding:
        c = self.clock
        t0 = c.mark()
        x = self.normalise(batch)
        t1 = c.mark()
        with self._autocast():
            if not self.tokens:
                feats = self.encoder.embed(x, patch_size=self.patch_size, pooling=self.pooling).float()
                tokens = None
            else:
                out = self.encoder.forward_features(x, patch_size=self.patch_size)
                cls, patch = out["cls"].float(), out["patch"].float()
                self.grid = tuple(int(g) for g in out["grid"])
                feats = cls if self.pooling == "cls" else torch.cat([cls, patch.mean(dim=1)], dim=1)
                tokens = patch.to(torch.float16)
        t2 = c.mark()
        c.add("h2d", t0, t1)
        c.add("model", t1, t2)
        feats = self._to_host(feats)
        tokens = None if tokens is None else self._to_host(tokens)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return PendingEmbedding(feats, tokens, done)

    def __call__(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        return self.submit(batch).result()


class BatchPacker:
    """Packs reader tiles (uint8 [n, T, T, 3]) into batches [B, T, T, 3] held in ``buffers`` host tensors.

    Pinned on CUDA, so the copy to the device is asynchronous. A batch's buffer is reused
    ``buffers`` batches later: with at most one batch in flight (``embed_slides`` waits for batch k-1
    after submitting batch k), three buffers never overwrite a batch still being copied.
    """

    def __init__(self, batch_size: int, tile_size: int, pin: bool, buffers: int = 3):
        shape = (batch_size, tile_size, tile_size, 3)
        self.buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(buffers)]
        self.batch_size, self.k, self.n = batch_size, 0, 0

    def add(self, tiles: np.ndarray) -> Iterator[torch.Tensor]:
        """Copy ``tiles`` in; yield each batch that fills up."""
        i = 0
        while i < len(tiles):
            buf = self.buffers[self.k % len(self.buffers)].numpy()
            m = min(self.batch_size - self.n, len(tiles) - i)
            buf[self.n:self.n + m] = tiles[i:i + m]
            self.n += m
            i += m
            if self.n == self.batch_size:
                yield self._take()

    def flush(self) -> torch.Tensor | None:
        """The partial last batch of a slide, if any."""
        return self._take() if self.n else None

    def reset(self) -> None:
        self.n = 0

    def _take(self) -> torch.Tensor:
        batch = self.buffers[self.k % len(self.buffers)][:self.n]
        self.k, self.n = self.k + 1, 0
        return batch
