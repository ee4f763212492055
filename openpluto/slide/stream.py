"""One pool of reader processes for a whole run; slides stream through it, tiles come back in order.

``TileStream(plan_fn, workers=N, ...)`` forks N worker processes once. ``stream(jobs)`` yields, for
each ``ReadJob`` in order: ``SlidePlanned`` (the worker-made plan: ``plan.coords`` [N, 2] level-0
corners), ``SlideTiles`` (consecutive tiles, uint8 [n, T, T, 3], in plan order) and ``SlideDone`` --
or ``SlideFailed`` at any point, after which that slide yields nothing more. Meanwhile the workers
plan the next slides and read ahead into a fixed set of shared-memory slots, so the next slide's
tiles are queued while the current one is still on the model, and memory is bounded by the slots
(``slot_mb`` each), not by the slide size.

Isolation: each job (planning a slide, or reading one block of its tiles) runs in a worker process
with a ``timeout``; a worker that hangs is killed, one that crashes (segfault in a C reader) is
found dead, and either way only that slide fails (``kind`` "timeout" / "crash"; a Python exception
is "error"); a fresh worker takes its place and the other slides go on. ``workers=0`` runs
everything in the calling process (no isolation, no timeout; for debugging and tiny runs).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from openpluto.errors import OpenPlutoError, exception_line
from openpluto.slide.fastread import ReaderStats, TileReader

# ----------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class ReadJob:
    """One slide to read: ``key`` (unique in the run), ``path``, tiles of ``tile_size`` px at ``mpp``.

    ``context`` is passed to the plan function with the job (e.g. the embed settings).
    """

    key: str
    path: str
    mpp: float
    tile_size: int
    mpp_override: float | None = None
    allow_upsample: bool = False
    context: Any = None


@dataclass
class SlidePlanned:
    job: ReadJob
    plan: Any


@dataclass
class SlideTiles:
    """Tiles ``start .. start + len(tiles)`` of the plan; ``tiles`` is valid until the next event."""

    job: ReadJob
    start: int
    tiles: np.ndarray


@dataclass
class SlideDone:
    job: ReadJob
    stats: StreamStats


@dataclass
class SlideFailed:
    job: ReadJob
    error: str  # one line, names the file
    kind: str  # "error" | "timeout" | "crash"


@dataclass
class StreamStats:
    """Worker-side seconds (summed over workers): plan, open, read (+decode), resize; tiles read."""

    plan: float = 0.0
    reader: ReaderStats = field(default_factory=ReaderStats)
    backends: set[str] = field(default_factory=set)

    def add(self, other: StreamStats) -> None:
        self.plan += other.plan
        self.reader.add(other.reader)
        self.backends |= other.backends

    def as_dict(self) -> dict[str, float]:
        r = self.reader
        return {"plan_s": self.plan, "open_s": r.open, "read_decode_s": r.read, "resize_s": r.resize,
                "tiles": r.tiles}


Event = SlidePlanned | SlideTiles | SlideDone | SlideFailed
# Requests to a worker stay well under a pipe's 64 KiB buffer, so the main process never blocks
# sending while a worker blocks sending it a large answer (a plan). Slide jobs and coordinates of one
# read are a few KiB.
_MAX_REQUEST = 16 * 1024


def _post(conn, msg: Any) -> None:
    """Send a request on a worker pipe (at most ``_MAX_REQUEST`` bytes); a dead worker's broken pipe is
    noticed elsewhere."""
    data = ForkingPickler.dumps(msg)
    if len(data) > _MAX_REQUEST:
        raise ValueError(f"a request to a reader process is {len(data)} bytes; keep requests small")
    with contextlib.suppress(OSError, ValueError):
        conn.send_bytes(data)


# ----------------------------------------------------------------------------- worker side


def one_line_error(e: BaseException, path: str) -> str:
    """A one-line message naming ``path`` (OpenPlutoError messages already do)."""
    if isinstance(e, OpenPlutoError):
        msg = " ".join(str(e).split())
        return msg if path in msg else f"{path}: {msg}"
    return f"{path}: {exception_line(e)}"


class _Readers:
    """TileReaders of the slides a worker is reading (a few, least recently used closed first)."""

    def __init__(self, options: dict, keep: int = 2):
        self.options, self.keep = options, keep
        self._open: OrderedDict[str, TileReader] = OrderedDict()

    def get(self, job: ReadJob) -> TileReader:
        r = self._open.get(job.key)
        if r is None:
            r = TileReader(job.path, job.mpp, job.tile_size, mpp_override=job.mpp_override,
                           allow_upsample=job.allow_upsample, **self.options)
            self._open[job.key] = r
            while len(self._open) > self.keep:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(job.key)
        return r

    def __contains__(self, key: str) -> bool:
        return key in self._open

    def forget(self, key: str) -> None:
        r = self._open.pop(key, None)
        if r is not None:
            r.close()

    def close(self) -> None:
        for key in list(self._open):
            self.forget(key)


def _run_job(kind: str, job: ReadJob, payload: Any, plan_fn: Callable, readers: _Readers,
             slots: np.ndarray | None) -> tuple[Any, StreamStats]:
    stats = StreamStats()
    if kind == "plan":
        t0 = time.perf_counter()
        plan = plan_fn(job)
        stats.plan = time.perf_counter() - t0
        return plan, stats
    coords, slot = payload
    new = job.key not in readers
    reader = readers.get(job)
    before = ReaderStats() if new else ReaderStats(**vars(reader.stats))
    out = slots[slot] if slots is not None else None
    tiles = reader.read(coords, out=out)
    r = reader.stats
    stats.reader = ReaderStats(r.open - before.open, r.read - before.read, r.resize - before.resize,
                               r.tiles - before.tiles)
    stats.backends.add(reader.source.describe())
    return (len(coords) if slots is not None else tiles), stats


def _call(job_id: int, fn: Callable, args: tuple) -> tuple:
    """Run a side job; its answer (errors as one line naming the function)."""
    try:
        fn(*args)
        return "ok", job_id, None, None
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        return "error", job_id, one_line_error(e, getattr(fn, "__name__", "side job")), None


def _worker(conn, shm_name: str | None, slot_shape: tuple, plan_fn: Callable, options: dict,
            inherited: list) -> None:
    """Worker loop: ``(kind, job_id, job, payload)`` in, ``(status, job_id, value, stats)`` out.

    ``inherited``: the main process's pipe ends this forked process got copies of; closed at once,
    so that every worker sees end-of-file (and exits) when the main process dies.
    """
    for c in inherited:
        c.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    shm = SharedMemory(name=shm_name) if shm_name else None
    slots = np.ndarray(slot_shape, np.uint8, buffer=shm.buf) if shm is not None else None
    readers = _Readers(options)
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg is None:
                break
            kind, job_id, job, payload = msg
            if kind == "forget":
                readers.forget(job.key)
                continue
            if kind == "call":
                conn.send(_call(job_id, *payload))
                continue
            try:
                value, stats = _run_job(kind, job, payload, plan_fn, readers, slots)
                conn.send(("ok", job_id, value, stats))
            except Exception as e:  # noqa: BLE001 - reported as this slide's one-line error
                readers.forget(job.key)
                conn.send(("error", job_id, one_line_error(e, job.path), None))
    finally:
        readers.close()
        del slots
        if shm is not None:
            shm.close()


# ----------------------------------------------------------------------------- main side


@dataclass
class _Slide:
    """Bookkeeping of one slide in the stream (main process)."""

    job: ReadJob
    plan: Any = None
    planned: bool = False
    plan_sent: bool = False
    announced: bool = False
    blocks: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each read job
    next_block: int = 0
    redo: deque = field(default_factory=deque)  # blocks to send again (their worker died meanwhile)
    next_out: int = 0
    ready: dict[int, tuple[int, int]] = field(default_factory=dict)  # block -> (slot, n)
    failed: tuple[str, str] | None = None
    stats: StreamStats = field(default_factory=StreamStats)

    def wants_reads(self) -> bool:
        more = bool(self.redo) or self.next_block < len(self.blocks)
        return self.planned and self.failed is None and more


@dataclass
class _Task:
    slide: _Slide | None  # None for a side job
    kind: str  # "plan" | "read" | "call"
    block: int = -1
    slot: int = -1
    sent: float = 0.0
    call: tuple | None = None  # (fn, args) of a side job


class _Worker:
    def __init__(self, proc, conn):
        self.proc, self.conn = proc, conn
        self.queue: deque[_Task] = deque()
        self.started = 0.0  # when the head of the queue started (or was sent)


class TileStream:
    """Reader processes shared by every slide of a run (see the module docstring).

    ``plan_fn(job) -> plan`` runs in a worker (a module-level function, so it pickles); the plan
    must have ``coords`` ([N, 2] level-0 corners, in the order tiles are wanted). ``options`` go
    to each ``TileReader`` (``backend``, ``dct_scaling``).
    """

    def __init__(self, plan_fn: Callable[[ReadJob], Any], tile_size: int, workers: int = 2,
                 timeout: float = 600.0, tiles_per_read: int = 64, slot_mb: float = 16.0,
                 queue_depth: int = 2, lookahead: int | None = None, options: dict | None = None):
        self.plan_fn = plan_fn
        self.tile_size = int(tile_size)
        self.workers = int(workers)
        self.timeout = float(timeout)
        tile_bytes = self.tile_size * self.tile_size * 3
        self.tiles_per_read = max(1, min(int(tiles_per_read), int(slot_mb * 2**20) // tile_bytes))
        self.queue_depth = max(1, int(queue_depth))
        # Slides planned ahead of the one being read: as many as workers, so that many small slides
        # (planning ~1 s each) still keep a large pool busy.
        self.lookahead = max(2, self.workers) if lookahead is None else max(0, int(lookahead))
        self.options = dict(options or {})
        self.n_slots = max(4, self.workers * self.queue_depth + 2)
        self.stats = StreamStats()
        self.side_errors: list[str] = []  # one line per failed side job (see ``post``)
        self._side: deque[tuple[Callable, tuple]] = deque()
        self._shm: SharedMemory | None = None
        self._slots: np.ndarray | None = None
        self._free: list[int] = []
        self._pool: list[_Worker] = []
        self._ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> TileStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        if self._shm is not None or self.workers == 0:
            return
        shape = (self.n_slots, self.tiles_per_read, self.tile_size, self.tile_size, 3)
        self._shm = SharedMemory(create=True, size=int(np.prod(shape)))
        self._slots = np.ndarray(shape, np.uint8, buffer=self._shm.buf)
        self._free = list(range(self.n_slots))
        for _ in range(self.workers):
            self._pool.append(self._spawn())

    def _spawn(self) -> _Worker:
        assert self._shm is not None and self._slots is not None
        here, there = self._ctx.Pipe(duplex=True)
        forked = self._ctx.get_start_method() == "fork"
        inherited = [here, *(w.conn for w in self._pool)] if forked else []
        proc = self._ctx.Process(target=_worker, name="openpluto-reader", daemon=True,
                                 args=(there, self._shm.name, self._slots.shape, self.plan_fn, self.options,
                                       inherited))
        proc.start()
        there.close()
        return _Worker(proc, here)

    def close(self) -> None:
        """Stop the workers and free the shared memory (idempotent)."""
        for w in self._pool:
            _post(w.conn, None)
        deadline = time.monotonic() + 5.0
        for w in self._pool:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self._pool = []
        self._slots = None
        if self._shm is not None:
            self._shm.unlink()
            with contextlib.suppress(BufferError):  # a caller still holds a tiles view: freed with it
                self._shm.close()
            self._shm = None

    def post(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` in a reader process when one is free (e.g. a picture of a finished slide).

        A module-level function (it is pickled) with small arguments (paths and numbers: what the
        main process sends a worker must fit in a pipe's buffer, or both could wait on each other);
        it runs before the current ``stream`` ends; a failure is a line in ``side_errors``.
        """
        if len(ForkingPickler.dumps(args)) > _MAX_REQUEST:
            raise ValueError(f"arguments of side job {getattr(fn, '__name__', fn)} are too large to send")
        if self.workers == 0 or not self._pool:
            answer = _call(0, fn, args)
            if answer[0] == "error":
                self.side_errors.append(answer[2])
            return
        self._side.append((fn, args))

    # ------------------------------------------------------------------ streaming
    def stream(self, jobs: Iterable[ReadJob]) -> Iterator[Event]:
        """Events of every job, slide after slide (see the module docstring)."""
        if self.workers == 0:
            yield from self._inline(jobs)
            return
        self._start()
        finished = False
        try:
            yield from self._events(iter(jobs))
            finished = True
        finally:
            if not finished:  # abandoned mid-way: jobs may still be in flight, start afresh next time
                self.close()

    def _events(self, pending: Iterator[ReadJob]) -> Iterator[Any]:
        active: deque[_Slide] = deque()
        exhausted = False
        while True:
            while not exhausted and len(active) <= self.lookahead:
                job = next(pending, None)
                if job is None:
                    exhausted = True
                else:
                    active.append(_Slide(job))
            self._dispatch(active)
            if not active:
                if not self._side and not any(w.queue for w in self._pool):
                    return
                self._wait()  # side jobs still running
                continue
            head = active[0]
            event, slot = self._next_event(head)
            if event is None:
                self._wait()
                continue
            if isinstance(event, SlideDone | SlideFailed):
                active.popleft()
                self._forget(head)
            yield event
            if slot >= 0:
                self._free.append(slot)

    def _next_event(self, s: _Slide) -> tuple[Any, int]:
        """The head slide's next event, if it is ready (and the slot to free once it is consumed)."""
        if s.failed is not None:
            for slot, _ in s.ready.values():
                self._free.append(slot)
            s.ready.clear()
            return SlideFailed(s.job, *s.failed), -1
        if not s.planned:
            return None, -1
        if not s.announced:
            s.announced = True
            return SlidePlanned(s.job, s.plan), -1
        if s.next_out >= len(s.blocks):
            self.stats.add(s.stats)
            return SlideDone(s.job, s.stats), -1
        got = s.ready.pop(s.next_out, None)
        if got is None:
            return None, -1
        assert self._slots is not None
        slot, n = got
        start = s.blocks[s.next_out][0]
        s.next_out += 1
        return SlideTiles(s.job, start, self._slots[slot, :n]), slot

    def _dispatch(self, active: deque[_Slide]) -> None:
        """Give idle workers the next jobs: plans early, reads in slide order, one slot kept for the head."""
        for i, w in enumerate(self._pool):
            if not w.queue and not w.proc.is_alive():  # died while idle (e.g. OOM killer): no one to blame
                w.conn.close()
                self._pool[i] = self._spawn()
        for w in sorted(self._pool, key=lambda w: len(w.queue)):
            while len(w.queue) < self.queue_depth:
                task = self._next_task(active)
                if task is None:
                    return
                self._send(w, task)

    def _next_task(self, active: deque[_Slide]) -> _Task | None:
        for i, s in enumerate(active):
            if i == 1 and self._side:  # side jobs right after the head slide's reads
                return _Task(None, "call", call=self._side.popleft())
            if s.failed is not None:
                continue
            if not s.plan_sent:
                s.plan_sent = True
                return _Task(s, "plan")
            if not s.wants_reads():
                continue
            if not self._free or (i > 0 and len(self._free) < 2):
                return None
            block = s.redo.popleft() if s.redo else s.next_block
            if block == s.next_block:
                s.next_block += 1
            return _Task(s, "read", block, self._free.pop())
        if self._side:
            return _Task(None, "call", call=self._side.popleft())
        return None

    def _send(self, w: _Worker, task: _Task) -> None:
        s = task.slide
        payload = task.call
        if task.kind == "read":
            a, b = s.blocks[task.block]
            payload = (np.asarray(s.plan.coords[a:b], np.int64), task.slot)
        task.sent = time.monotonic()
        if not w.queue:
            w.started = task.sent
        w.queue.append(task)
        _post(w.conn, (task.kind, id(task), s.job if s else None, payload))  # a dead one is found by _wait

    def _forget(self, s: _Slide) -> None:
        for w in self._pool:
            _post(w.conn, ("forget", 0, s.job, None))

    def _wait(self) -> None:
        """Block until a worker answers, dies or runs past the timeout; handle what happened."""
        busy = [w for w in self._pool if w.queue]
        if not busy:
            raise RuntimeError("tile stream stalled: no job in flight and no event ready (a bug)")
        limit = min(w.started for w in busy) + self.timeout
        wait([w.conn for w in busy] + [w.proc.sentinel for w in busy],
             timeout=max(0.0, limit - time.monotonic()))
        for w in busy:
            try:
                while w.queue and w.conn.poll():
                    self._answer(w, w.conn.recv())
            except (EOFError, OSError):
                self._replace(w, "crash")
                continue
            if w.queue and not w.proc.is_alive():
                self._replace(w, "crash")
            elif w.queue and time.monotonic() - w.started > self.timeout:
                self._replace(w, "timeout")

    def _answer(self, w: _Worker, msg: tuple) -> None:
        status, _, value, stats = msg
        task = w.queue.popleft()
        w.started = time.monotonic()
        s = task.slide
        if s is None:
            if status == "error":
                self.side_errors.append(value)
            return
        if s.failed is not None:  # a late answer for a slide that already failed
            if task.slot >= 0:
                self._free.append(task.slot)
            return
        if status == "error":
            s.failed = (value, "error")
            if task.slot >= 0:
                self._free.append(task.slot)
            return
        s.stats.add(stats)
        if task.kind == "plan":
            s.plan, s.planned = value, True
            n = len(value.coords)
            step = self.tiles_per_read
            s.blocks = [(a, min(n, a + step)) for a in range(0, n, step)]
        else:
            s.ready[task.block] = (task.slot, int(value))

    def _replace(self, w: _Worker, kind: str) -> None:
        """Kill ``w`` (hung) or bury it (crashed); its current slide fails, its queued jobs go elsewhere."""
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        w.conn.close()
        head, rest = w.queue[0], list(w.queue)[1:]
        s = head.slide
        if s is None:
            name = getattr(head.call[0], "__name__", "side job") if head.call else "side job"
            self.side_errors.append(f"{name}: {'timed out' if kind == 'timeout' else 'crashed its process'}")
        elif s.failed is None:
            if kind == "timeout":
                what = "planning it" if head.kind == "plan" else "reading a block of tiles"
                s.failed = (f"{s.job.path}: timed out after {self.timeout:g} s {what} (reader hung?)", kind)
            else:
                s.failed = (f"{s.job.path}: reader process crashed (exit code {w.proc.exitcode})", kind)
        for t in [head, *rest]:
            if t.slot >= 0:
                self._free.append(t.slot)
            if t is head or (t.slide is not None and t.slide.failed is not None):
                continue
            if t.slide is None:
                self._side.append(t.call)
            elif t.kind == "plan":
                t.slide.plan_sent = False
            else:
                t.slide.redo.append(t.block)
        self._pool[self._pool.index(w)] = self._spawn()

    # ------------------------------------------------------------------ in-process (workers=0)
    def _inline(self, jobs: Iterable[ReadJob]) -> Iterator[Any]:
        readers = _Readers(self.options)
        try:
            for job in jobs:
                try:
                    plan, stats = _run_job("plan", job, None, self.plan_fn, readers, None)
                except Exception as e:  # noqa: BLE001 - this slide fails, the run goes on
                    yield SlideFailed(job, one_line_error(e, job.path), "error")
                    continue
                yield SlidePlanned(job, plan)
                n = len(plan.coords)
                failed = False
                for a in range(0, n, self.tiles_per_read):
                    coords = np.asarray(plan.coords[a:a + self.tiles_per_read], np.int64)
                    try:
                        tiles, st = _run_job("read", job, (coords, -1), self.plan_fn, readers, None)
                    except Exception as e:  # noqa: BLE001
                        yield SlideFailed(job, one_line_error(e, job.path), "error")
                        failed = True
                        break
                    stats.add(st)
                    yield SlideTiles(job, a, tiles)
                readers.forget(job.key)
                if not failed:
                    self.stats.add(stats)
                    yield SlideDone(job, stats)
        finally:
            readers.close()
