"""Decoding uploads in worker processes that the service can end.

:class:`DecodePool` keeps a few spawned processes; each caps its own address space at start
(``RLIMIT_AS`` = its virtual size after imports + a per-decode budget) and takes one job at a
time over a pipe: the upload's bytes in, the decoded ``uint8`` gray image out. The image's
declared size is read from its header inside the worker too, so no untrusted byte is parsed in
the service's process beyond the first few that say which format it is.

- A job that outlives its time limit: the parent SIGKILLs that worker before it raises
  :class:`DecodeTimeout`, and starts a replacement.
- A decode that needs more memory than the budget: the allocation fails inside the worker
  (``MemoryError``), which is replaced; :class:`DecodeOutOfMemory`.
- A worker that dies (a decoder library crashing on the input, a kill from outside):
  :class:`DecoderCrashed`, and it is replaced.
- A service that dies: an idle worker sees its pipe close and exits; a busy one ends itself
  (SIGALRM) :data:`ALARM_GRACE_S` after its job's deadline.

So the service's memory stays within its idle size plus workers x budget, and no decode runs on
after its request has been answered.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot end one running task. Cancelling a
future only drops a task that has not started; killing a worker behind its back marks the whole
executor broken (``BrokenProcessPool``) and fails every other task in flight. Here each worker
is its own process with its own pipe, so one is killed and replaced without touching the rest.
Why spawn, not fork: the service holds torch and its threads, and forking a multi-threaded
process can deadlock the child; a spawned worker imports only the decoders (and, as spawned
processes do, the main module: a script that starts a pool needs the ``__main__`` guard).
The cap reads the worker's size from Linux's ``/proc``; without it a worker runs uncapped
and the parent logs a warning.

What comes back from a worker is read as JSON and raw pixel bytes of a size the parent checks,
never unpickled: a worker parses untrusted input and is not trusted with the parent's code.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import re
import resource
import signal
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from multiprocessing import BufferTooShort
from typing import Any

import numpy as np

from cxr.data.images import decode_gray
from cxr.errors import ConfigError, CxrError, ImageError
from cxr.serve.limits import (
    DEFAULT_DECODE_WORKERS,
    DEFAULT_MAX_PIXELS,
    TOO_BIG,
    default_memory_budget,
    header_size,
    sniff,
)

START_TIMEOUT_S = 60.0
MAX_REPLY_HEADER = 64 * 1024
# A worker ends itself (SIGALRM) this long after its job's deadline: the parent kills it at
# the deadline, so this only matters when the parent is gone (killed) mid-job.
ALARM_GRACE_S = 5.0
log = logging.getLogger("cxr.serve")

DecodeFunction = Callable[[bytes, str], np.ndarray]


class DecodeTimeout(CxrError):
    """The decode did not finish within its time limit; its worker was ended."""


class DecodeRefused(ImageError):
    """The worker refused the image; ``kind`` is the class name of the worker's error
    (``ImageError``, ``TooManyPixels``, or a subclass from :mod:`cxr.data.images`)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class DecodeOutOfMemory(ImageError):
    """Decoding needed more memory than the per-decode budget; the worker was replaced."""


class DecoderCrashed(ImageError):
    """The worker died while decoding (a signal or an exit); it was replaced."""


class DecoderFailed(CxrError):
    """An unexpected error inside the worker (a bug, not the image); ``kind`` is its class."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class DecoderUnavailable(CxrError):
    """A worker process could not be started."""


class TooManyPixels(ImageError):
    """The image has more pixels than the service accepts (read from its header)."""


def decode_upload(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """What a worker runs by default: the header's size against ``max_pixels``, then decode."""
    kind = sniff(data)
    size = header_size(data, kind) if kind else None
    if size is not None and size[0] * size[1] > max_pixels:
        shown = "too many" if size == TOO_BIG else f"{size[0]}x{size[1]}"
        raise TooManyPixels(
            f"{name}: image is {shown} pixels, more than the limit of {max_pixels:,}"
        )
    gray = decode_gray(data, name=name, max_pixels=max_pixels)
    if gray.size > max_pixels:
        raise TooManyPixels(f"{name}: image has more than {max_pixels:,} pixels")
    return gray


class DecodePool:
    """``workers`` spawned decoding processes, each capped at ``memory_bytes`` per decode.

    ``decode(data, name)`` runs in the worker (a module-level function or a ``partial`` of
    one, so that it pickles); by default :func:`decode_upload` with ``max_pixels``. Workers
    start on first use or on :meth:`start`; :meth:`close` ends them. Thread-safe: each call
    of :meth:`decode` takes one idle worker, or waits for one within its time limit.
    """

    def __init__(
        self,
        workers: int = DEFAULT_DECODE_WORKERS,
        memory_bytes: int | None = None,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decode: DecodeFunction | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        if int(workers) < 1:
            raise ConfigError(f"decode workers must be at least 1, not {workers}")
        memory = default_memory_budget(max_pixels) if memory_bytes is None else int(memory_bytes)
        if memory <= 0:
            raise ConfigError(f"the per-decode memory budget must be positive, not {memory}")
        self.workers = int(workers)
        self.memory_bytes = memory
        self.max_pixels = int(max_pixels)
        self.function = decode or partial(decode_upload, max_pixels=self.max_pixels)
        self.start_timeout_s = float(start_timeout_s)
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")
        self._idle: queue.Queue[_Slot] = queue.Queue()
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()
        self._closed = False
        # Workers end with the pool, even one nobody closes (an app dropped by a test).
        self._finalizer = weakref.finalize(self, _end_workers, self._slots)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the workers (at once, in parallel) unless they run already."""
        with self._lock:
            if self._closed:
                raise DecoderUnavailable("the decoding pool is closed")
            if self._slots:
                return
            slots: list[_Slot] = []
            try:
                for _ in range(self.workers):
                    slots.append(_Slot(self._spawn()))
                for slot in slots:
                    slot.worker.wait_ready(self.start_timeout_s)
            except BaseException as exc:
                for slot in slots:
                    slot.worker.end()
                if isinstance(exc, DecoderUnavailable):
                    raise
                raise DecoderUnavailable(f"cannot start the decoding workers ({exc})") from None
            self._slots.extend(slots)
            for slot in slots:
                self._idle.put(slot)

    def close(self) -> None:
        """End every worker; later calls of :meth:`decode` raise :class:`DecoderUnavailable`."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def pids(self) -> list[int]:
        """The process ids of the workers running now (for tests and /healthz)."""
        return [s.worker.pid for s in list(self._slots) if s.worker is not None]

    def describe(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "running": len(self.pids()),
            "memory_budget_mb": round(self.memory_bytes / 2**20),
            "restarts": self.restarts,
        }

    # ------------------------------------------------------------------ decoding

    def decode(self, data: bytes, *, name: str, timeout: float | None = None) -> np.ndarray:
        """The ``(H, W) uint8`` image that ``data`` holds, decoded in a worker.

        ``timeout`` (seconds, ``None`` for none) counts from this call, waiting for an idle
        worker included. Raises :class:`DecodeTimeout` (the worker was killed first),
        :class:`DecodeRefused`, :class:`DecodeOutOfMemory`, :class:`DecoderCrashed`,
        :class:`DecoderFailed` or :class:`DecoderUnavailable`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.start()
        slot = self._acquire(name, deadline)
        healthy = False
        try:
            reply, pixels = slot.worker.run(data, name, deadline, self.max_pixels)
            healthy = reply["status"] not in ("memory",)
        except _Expired:
            raise DecodeTimeout(f"{name}: not decoded within {timeout:g} s") from None
        except (EOFError, OSError, ValueError, KeyError, TypeError, BufferTooShort):
            # Died mid-job, or answered something that is not a reply (malformed JSON, an
            # oversized pixel payload): either way its state is unknown, so it is replaced.
            code = slot.worker.end()
            raise DecoderCrashed(f"{name}: the decoder stopped on this image ({code})") from None
        finally:
            if healthy:
                self._release(slot)
            else:  # killed, dead, out of memory or in an unknown state: a fresh one
                self._renew(slot)
        return _result(reply, pixels, name, self.memory_bytes)

    def _acquire(self, name: str, deadline: float | None) -> _Slot:
        try:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if wait == 0.0:
                raise queue.Empty
            slot = self._idle.get(timeout=wait)
        except queue.Empty:
            raise DecodeTimeout(f"{name}: no decoder became free within the time limit") from None
        if slot.worker is None or not slot.worker.alive():
            try:
                self._fill(slot, deadline)
            except BaseException as exc:  # the slot always goes back, whatever the failure
                self._idle.put(slot)
                if isinstance(exc, DecoderUnavailable):
                    raise
                raise DecoderUnavailable(f"cannot start a decoding worker ({exc})") from None
        return slot

    def _release(self, slot: _Slot) -> None:
        self._idle.put(slot)

    def _renew(self, slot: _Slot) -> None:
        """End the slot's worker now; start its replacement in the background."""
        worker, slot.worker = slot.worker, None
        try:
            if worker is not None:
                worker.end()
        finally:
            with self._lock:
                self.restarts += 1

        def refill() -> None:
            try:
                self._fill(slot)
            except Exception as exc:  # the next job that takes the slot tries again
                if not self._closed:
                    log.error("decoding worker could not be restarted: %s", exc)
            finally:
                self._idle.put(slot)

        threading.Thread(target=refill, name="cxr-decode-restart", daemon=True).start()

    def _fill(self, slot: _Slot, deadline: float | None = None) -> None:
        """Start a worker for ``slot``, waiting for it at most until ``deadline`` (a request's)
        or ``start_timeout_s``."""
        worker, slot.worker = slot.worker, None
        if worker is not None:
            worker.end()
        if self._closed:
            raise DecoderUnavailable("the decoding pool is closed")
        wait = self.start_timeout_s
        if deadline is not None:
            wait = max(0.01, min(wait, deadline - time.monotonic()))
        worker = self._spawn()
        try:
            worker.wait_ready(wait)
        except DecoderUnavailable:
            worker.end()
            raise
        with self._lock:
            if self._closed:
                worker.end()
                raise DecoderUnavailable("the decoding pool is closed")
            slot.worker = worker

    def _spawn(self) -> _Worker:
        return _Worker(self._context, self.function, self.memory_bytes)


def _result(reply: dict, pixels: np.ndarray | None, name: str, budget: int) -> np.ndarray:
    """The decoded image from a worker's reply, or the error the reply stands for."""
    status = reply["status"]
    if status == "ok" and pixels is not None:
        return pixels
    if status == "refused":
        raise DecodeRefused(str(reply["kind"]), str(reply["message"]))
    if status == "memory":
        raise DecodeOutOfMemory(
            f"{name}: decoding needs more memory than the per-decode budget of "
            f"{budget / 2**20:,.0f} MiB"
        )
    raise DecoderFailed(str(reply.get("kind", "?")), str(reply.get("message", "")))


def _end_workers(slots: list[_Slot]) -> None:
    for slot in slots:
        if slot.worker is not None:
            slot.worker.end()
            slot.worker = None


class _Expired(Exception):
    """The worker did not answer by the deadline (and has been killed)."""


class _Slot:
    """A place for one worker; the idle queue holds slots, so a replacement keeps its place."""

    def __init__(self, worker: _Worker | None):
        self.worker = worker


class _Worker:
    """One spawned decoding process and the parent's end of its pipe."""

    def __init__(self, context, function: DecodeFunction, memory_bytes: int):
        parent, child = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_serve_jobs,
            args=(child, function, memory_bytes),
            daemon=True,
            name="cxr-decode",
        )
        self.process.start()
        child.close()
        self.conn = parent
        self.pid: int = self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def wait_ready(self, timeout: float) -> None:
        try:
            if not self.conn.poll(timeout):
                raise DecoderUnavailable(f"a decoding worker did not start within {timeout:g} s")
            ready = json.loads(self.conn.recv_bytes(MAX_REPLY_HEADER))
        except (EOFError, OSError, ValueError):
            self.process.join(5)
            raise DecoderUnavailable(
                f"a decoding worker exited while starting (exit code {self.process.exitcode})"
            ) from None
        if ready.get("limit") is None:
            log.warning("decoding worker %d runs without a memory cap: %s", self.pid, ready)

    def run(
        self, data: bytes, name: str, deadline: float | None, max_pixels: int
    ) -> tuple[dict, np.ndarray | None]:
        """Send one job; the reply (and the pixels) or :class:`_Expired` after killing."""
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        alarm = 0.0 if wait is None else wait + ALARM_GRACE_S
        self.conn.send_bytes(json.dumps({"name": name, "alarm": alarm}).encode())
        self.conn.send_bytes(data)
        if not self.conn.poll(wait):
            self.end()
            raise _Expired
        reply = json.loads(self.conn.recv_bytes(MAX_REPLY_HEADER))
        if not isinstance(reply, dict) or "status" not in reply:
            raise OSError("malformed reply from a decoding worker")
        if reply["status"] != "ok":
            return reply, None
        shape = reply.get("shape")
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(type(n) is int for n in shape)
            and shape[0] >= 1
            and shape[1] >= 1
            and shape[0] * shape[1] <= max_pixels
        ):
            raise OSError(f"a decoding worker sent an image of shape {str(shape)[:40]}")
        pixels = np.empty(shape, dtype=np.uint8)
        # Flat: the pipe counts a 2-D buffer's length in rows.
        if self.conn.recv_bytes_into(pixels.reshape(-1)) != pixels.nbytes:
            raise OSError("a decoding worker sent fewer pixels than it announced")
        return reply, pixels

    def end(self) -> str:
        """Kill and reap the process (no-op if it has exited); how it ended, in words."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                return f"signal {signal.Signals(-code).name}"
            except ValueError:  # a real-time signal has no name
                return f"signal {-code}"
        return f"exit code {code}"


# ---------------------------------------------------------------------------- in the worker


def _serve_jobs(conn, function: DecodeFunction, memory_bytes: int) -> None:
    """The worker's main loop: cap the address space, then decode one job after another."""
    # Ctrl+C in a terminal reaches the whole process group: the parent stops its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the job alarm below ends the process
    limit = _cap_address_space(memory_bytes)
    conn.send_bytes(json.dumps({"status": "ready", "pid": os.getpid(), "limit": limit}).encode())
    parent = os.getppid()
    while True:
        try:
            # An idle worker whose service was killed (SIGKILL, SIGTERM without cleanup) may
            # never see its pipe close: it checks once a second that its parent still lives.
            while not conn.poll(1.0):
                if os.getppid() != parent:
                    return
            job = json.loads(conn.recv_bytes())
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent closed the pipe (the pool is closing, or the parent is gone)
        # SIGALRM's default action ends the process, even inside a decoder's C code.
        signal.setitimer(signal.ITIMER_REAL, float(job["alarm"]))
        reply, pixels = _decode_one(function, data, str(job["name"]))
        signal.setitimer(signal.ITIMER_REAL, 0)
        del data
        try:
            conn.send_bytes(json.dumps(reply).encode())
            if pixels is not None:
                conn.send_bytes(pixels.reshape(-1))
        except (OSError, MemoryError, ValueError):
            return
        if reply["status"] == "memory":
            return  # the parent replaces this worker; its heap may be fragmented


def _decode_one(function: DecodeFunction, data: bytes, name: str) -> tuple[dict, Any]:
    try:
        gray = np.ascontiguousarray(function(data, name))
        if gray.dtype != np.uint8 or gray.ndim != 2:
            message = f"the decoder returned {gray.dtype} of shape {gray.shape}, not 2-D uint8"
            return {"status": "failed", "kind": "TypeError", "message": message}, None
        return {"status": "ok", "shape": list(gray.shape)}, gray
    except MemoryError:
        return {"status": "memory"}, None
    except ImageError as exc:
        if _caused_by_memory(exc):  # a decoder that wraps every failure, MemoryError included
            return {"status": "memory"}, None
        # Cut: a message may quote the file (a UID, a header value), and the reply's header
        # must stay small.
        message = str(exc)
        message = message if len(message) <= 500 else message[:497] + "..."
        return {"status": "refused", "kind": type(exc).__name__, "message": message}, None
    except Exception as exc:
        return {"status": "failed", "kind": type(exc).__name__, "message": str(exc)[:500]}, None


def _caused_by_memory(exc: BaseException) -> bool:
    seen = 0
    cause = exc.__cause__ or exc.__context__
    while cause is not None and seen < 10:
        if isinstance(cause, MemoryError):
            return True
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return False


def _cap_address_space(memory_bytes: int) -> int | None:
    """Set RLIMIT_AS (soft and hard) to this process's virtual size now + ``memory_bytes``.

    ``None`` where the size cannot be read (no ``/proc``): the worker then runs uncapped.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            found = re.search(r"^VmSize:\s+(\d+) kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    if found is None:
        return None
    limit = int(found.group(1)) * 1024 + memory_bytes
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit
