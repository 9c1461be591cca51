"""``BatchScheduler``: collects concurrent requests, routes them, and runs them as mixed batches.

One worker thread owns the model and keeps one continuous batch running (``backend.decode_batch``):
before every step it admits waiting jobs (up to ``max_batch`` running), routes the ``"auto"`` ones
with one base forward and hands each to the backend (the PEFT backend prefills it alone); the step
decodes one token for every running request, and finished ones leave at once. Results and streamed
text go back to each job's asyncio queue; an error fails the jobs it touched, never the worker. A
job pinned to an adapter that was removed after it was accepted fails alone (``AdapterRemovedError``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

from delta_router.model_ids import AUTO_MODEL_NAME, BASE_ADAPTER
from delta_router.routing.router import RouteDecision, Router
from delta_router.serving.backends import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)


class AdapterRemovedError(LookupError):
    """The adapter a request named was removed (``DELETE /v1/adapters``) before the request ran."""


@dataclass
class Job:
    """One request in flight. ``route_text`` is what the router reads when ``adapter == AUTO_MODEL_NAME``."""

    request: GenerationRequest
    route_text: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(
        default_factory=asyncio.Queue
    )  # ("text", str) / ("done", ..) / ("error", ..)
    decision: RouteDecision | None = None

    def emit(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class BatchScheduler:
    def __init__(self, backend, router: Router | None = None, max_batch: int = 8):
        self.backend, self.router = backend, router
        self.max_batch = max_batch
        self.encoder = backend.encoder(**router.encoder_options) if router else None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        # batches: decode steps; rows: running requests summed over the steps
        self.stats = {"batches": 0, "rows": 0, "requests": 0, "errors": 0}
        # held while a batch is routed and generated, and while the registry changes what is served
        self.lock = threading.RLock()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="delta-router-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, job: Job) -> None:
        job.request.on_text = lambda text: job.emit("text", text)
        self._queue.put(job)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    # ---- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            batch, running = self.backend.decode_batch(), {}  # id(request) -> Job
        except Exception as err:  # noqa: BLE001 - a backend that cannot start fails each request
            logger.exception("the %s backend cannot decode", getattr(self.backend, "name", "?"))
            while (job := self._queue.get()) is not None:
                self._fail([job], err)
            return
        stopping = False
        while True:
            incoming = []
            if not len(batch):
                if stopping or (job := self._queue.get()) is None:
                    return
                incoming.append(job)
            while len(batch) + len(incoming) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True  # finish what runs, admit nothing more
                    break
                incoming.append(job)
            with self.lock:
                self._admit(batch, incoming, running)
                rows = len(batch)
                try:
                    finished = batch.step()
                except Exception as err:  # noqa: BLE001 - fail the running jobs, keep serving
                    self._fail([running.pop(id(r)) for r in batch.requests()], err)
                    batch.abort()
                    continue
            if rows:
                self.stats["batches"] += 1
                self.stats["rows"] += rows
            for request, result in finished:
                running.pop(id(request)).emit("done", result)

    def _admit(self, batch, jobs: list[Job], running: dict[int, Job]) -> None:
        """Route and prefill ``jobs`` into ``batch``; a job that fails or finishes at once is answered."""
        jobs = self._servable(jobs)
        try:
            self._route([job for job in jobs if job.request.adapter == AUTO_MODEL_NAME])
        except Exception as err:  # noqa: BLE001
            self._fail(jobs, err)
            return
        for job in jobs:
            try:
                result = self.backend.admit(batch, job.request)
            except Exception as err:  # noqa: BLE001
                self._fail([job], err)
                continue
            self.stats["requests"] += 1
            if result is None:
                running[id(job.request)] = job
            else:
                job.emit("done", result)

    def _servable(self, jobs: list[Job]) -> list[Job]:
        """``jobs`` whose adapter is still served; the others fail alone (``AdapterRemovedError``)."""
        served = {AUTO_MODEL_NAME, BASE_ADAPTER, *self.backend.model_ids()}
        for job in [job for job in jobs if job.request.adapter not in served]:
            job.emit("error", AdapterRemovedError(f"model {job.request.adapter!r} is no longer served"))
        return [job for job in jobs if job.request.adapter in served]

    def _route(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        if self.router is None:
            raise RuntimeError('model "auto" needs a router (serve --router DIR)')
        decisions = self.router.route(self.encoder, [job.route_text for job in jobs])  # the plain base
        for job, decision in zip(jobs, decisions, strict=True):
            job.decision = decision
            job.request.adapter = self.backend.target(decision)

    def _fail(self, jobs: list[Job], err: Exception) -> None:
        logger.exception("batch of %d failed", len(jobs), exc_info=err)
        self.stats["errors"] += len(jobs)
        for job in jobs:
            job.emit("error", err)


async def run_job(scheduler: BatchScheduler, job: Job) -> GenerationResult:
    """Submit and wait for the result (text deltas are dropped)."""
    scheduler.submit(job)
    while True:
        kind, payload = await job.events.get()
        if kind == "done":
            return payload
        if kind == "error":
            raise payload
