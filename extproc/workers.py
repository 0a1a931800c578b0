"""Several worker processes on one port, kept at strength by the parent that started them.

Rules:

* The parent starts ``workers`` processes (``spawn``) and keeps a pipe to each. A worker says
  ``ready`` once it serves; the parent tells every worker whether the group is at full
  strength (every slot has a worker that is ready). Below strength, every worker's health
  service reports ``NOT_SERVING``; the request path never looks at any of this.
* A worker that exits, whatever its exit code or signal, is restarted after the delay
  ``restarts.Restarts`` decides; when it gives up, the parent stops the other workers
  gracefully and exits ``restarts.EXIT_GAVE_UP``.
* SIGTERM or SIGINT to the parent cancels pending restarts, sends SIGTERM to every worker, waits
  for them (the shutdown grace plus ``STOP_MARGIN_S``, then SIGKILL) and exits 0.
* A worker whose pipe to the parent closes (the parent is gone) stops gracefully by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from extproc.adapters.telemetry import log_event
from extproc.config import Settings
from extproc.restarts import EXIT_GAVE_UP, GiveUp, Restarts

log = logging.getLogger("extproc.workers")

EXIT_STOPPED = 0
STOP_MARGIN_S = 5.0
_READY, _FULL, _BELOW = b"ready", b"full", b"below"

Target = Callable[[Settings, int, Connection], None]
"""A worker's entry point: ``(settings, slot, pipe)``; module-level, so ``spawn`` can pickle it."""


class Link:
    """A worker's end of its pipe: report ready, follow the group's strength."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def report_ready(self) -> bool:
        """Tell the parent this worker serves; ``False`` when the parent is gone."""
        try:
            self._conn.send_bytes(_READY)
        except OSError:
            return False
        return True

    async def join(
        self, apply: Callable[[bool], Awaitable[None]], on_gone: Callable[[], None]
    ) -> asyncio.Task[None]:
        """Apply "below strength" now, then follow the parent; ``on_gone`` once it is gone."""
        await apply(False)
        follower = asyncio.create_task(self.follow(apply))
        follower.add_done_callback(lambda _: on_gone())
        return follower

    async def follow(self, apply: Callable[[bool], Awaitable[None]]) -> None:
        """``apply`` each strength the parent announces; return once the parent is gone."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        loop.add_reader(self._conn.fileno(), self._receive, inbox)
        try:
            while (message := await inbox.get()) != b"":
                await apply(message == _FULL)
        finally:
            loop.remove_reader(self._conn.fileno())
        log_event(log, logging.WARNING, "supervisor gone, stopping")

    def _receive(self, inbox: asyncio.Queue[bytes]) -> None:
        try:
            inbox.put_nowait(self._conn.recv_bytes())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            inbox.put_nowait(b"")


@dataclass(eq=False)
class _Worker:
    slot: int
    process: BaseProcess
    conn: Connection | None
    started_at: float
    ready: bool = False

    def tell(self, message: bytes) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):  # it is exiting: its sentinel says so next
                self.conn.send_bytes(message)


class _Wakeup:
    """SIGTERM and SIGINT turned into a readable pipe, so one ``wait`` sees signals and workers."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def _on_signal(self, signum: int, _frame: object) -> None:
        with contextlib.suppress(BlockingIOError):  # already awake
            os.write(self._write, bytes([signum]))

    def fileno(self) -> int:
        return self._read

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._read)
        os.close(self._write)


class Supervisor:
    """Runs ``settings.workers`` workers of ``target`` until a stop signal, restarting them."""

    def __init__(self, target: Target, settings: Settings) -> None:
        self._target, self._settings = target, settings
        self._size, self._grace_s = settings.workers, settings.shutdown_grace_s
        self._restarts = Restarts(self._size)
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._due: dict[int, float] = {}  # slot -> when its worker starts again
        self._full = False

    def run(self) -> int:
        """Supervise; ``EXIT_STOPPED`` after a stop signal, ``EXIT_GAVE_UP`` after giving up."""
        wakeup = _Wakeup()
        try:
            for slot in range(self._size):
                self._start(slot)
            return self._watch(wakeup)
        finally:
            self._stop_all()
            wakeup.close()

    def _watch(self, wakeup: _Wakeup) -> int:
        while True:
            signalled = wakeup.fileno()
            fired = set(wait([signalled, *self._waitables()], timeout=self._next_due_in()))
            if signalled in fired:
                log_event(log, logging.INFO, "stopping workers", grace_s=self._grace_s)
                return EXIT_STOPPED
            for worker in list(self._workers.values()):
                if worker.process.sentinel in fired:
                    if self._exited(worker) is not None:
                        return EXIT_GAVE_UP
                elif worker.conn in fired:
                    self._hear(worker)
            self._start_due()
            self._announce()

    def _waitables(self) -> list[Any]:
        live = self._workers.values()
        return [w.process.sentinel for w in live] + [w.conn for w in live if w.conn is not None]

    def _next_due_in(self) -> float | None:
        if not self._due:
            return None
        return max(0.0, min(self._due.values()) - time.monotonic())

    def _start(self, slot: int) -> None:
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(
            target=self._target, args=(self._settings, slot, theirs), name=f"extproc-worker-{slot}"
        )
        process.start()
        theirs.close()
        self._workers[slot] = _Worker(slot, process, ours, time.monotonic())
        log_event(log, logging.INFO, "worker started", worker=slot, pid=process.pid)

    def _exited(self, worker: _Worker) -> GiveUp | None:
        """Forget ``worker``, then schedule its restart or return why the group gives up."""
        del self._workers[worker.slot]
        now, code = time.monotonic(), _reap(worker)
        decision = self._restarts.exited(worker.slot, now, now - worker.started_at)
        fields: dict[str, object] = {"worker": worker.slot, "pid": worker.process.pid}
        fields |= {"exitcode": code, "uptime_s": round(now - worker.started_at, 3)}
        if isinstance(decision, GiveUp):
            log_event(log, logging.WARNING, "worker exited", **fields)
            log_event(
                log,
                logging.ERROR,
                "giving up on the workers",
                reason=decision.reason,
                exit_code=EXIT_GAVE_UP,
            )
            return decision
        self._due[worker.slot] = now + decision.delay_s
        log_event(log, logging.WARNING, "worker exited", **fields, restart_in_s=decision.delay_s)
        return None

    def _hear(self, worker: _Worker) -> None:
        assert worker.conn is not None
        try:
            message = worker.conn.recv_bytes()
        except (EOFError, OSError):
            worker.conn = None  # closed: its sentinel fires next
            return
        worker.ready = worker.ready or message == _READY

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot, due in sorted(self._due.items()):
            if due <= now:
                del self._due[slot]
                self._start(slot)

    def _announce(self) -> None:
        """Tell every worker when the group reaches or falls below full strength."""
        ready = sum(worker.ready for worker in self._workers.values())
        full = ready == self._size
        if full == self._full:
            return
        self._full = full
        if full:
            self._restarts.at_full_strength()
        message = "workers at full strength" if full else "workers below strength"
        log_event(log, logging.INFO, message, ready=ready, workers=self._size)
        for worker in self._workers.values():
            worker.tell(_FULL if full else _BELOW)

    def _stop_all(self) -> None:
        """SIGTERM to every worker; SIGKILL to those still running after the grace."""
        self._due.clear()
        workers = list(self._workers.values())
        for worker in workers:
            worker.process.terminate()
        deadline = time.monotonic() + self._grace_s + STOP_MARGIN_S
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log_event(log, logging.WARNING, "worker killed", worker=worker.slot)
                worker.process.kill()
            code = _reap(worker)
            fields = {"worker": worker.slot, "pid": worker.process.pid, "exitcode": code}
            log_event(log, logging.INFO, "worker stopped", **fields)
        self._workers.clear()


def _reap(worker: _Worker) -> int | None:
    """Wait for the exited process, close our end of its pipe and return its exit code."""
    worker.process.join()
    if worker.conn is not None:
        worker.conn.close()
        worker.conn = None
    return worker.process.exitcode
