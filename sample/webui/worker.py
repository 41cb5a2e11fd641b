"""One generation thread fed by a FIFO queue, and the progress state A1111's `/sdapi/v1/progress` reports.

A model occupies the whole accelerator (or CPU), so jobs run one at a time in order of arrival; every request waits
on its own job's future and is answered when that job ends. A job is a function of a `JobControl`, through which it
reports progress (batch, step, the current latent for the live preview) and learns that it was interrupted (stop the
whole job, keep the finished batches), skipped (stop the current batch, go on with the next) or that the server is
stopping (end the job now; its request is answered 503).
"""
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sample.generate import Interrupted, Skipped  # generate() ends the job / drops the batch on them


class ServerStopping(RuntimeError):
    """Raised inside the running job, and set on the queued ones, when the server shuts down (HTTP 503)."""

    def __init__(self):
        super().__init__("the server is shutting down and stopped this job; send the request again once it is back")


class JobControl:
    """What a running job sees: progress setters and the interrupt / skip flags."""

    def __init__(self, job: "Job"):
        self.job = job
        self.interrupted = False
        self.skipped = False
        self.stopping = False
        self.job_no = 0
        self.job_count = 1
        self.batch_fraction = 0.0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.started = time.monotonic()
        self.textinfo = ""
        # The newest denoised estimate x0 of the batch's first image, [C, h, w] on the CPU, and a counter that
        # changes with it. The preview is rendered from it only when someone asks for progress, so sampling never
        # waits for an image encoder.
        self.latent: torch.Tensor | None = None
        self.latent_version = 0

    def begin_batch(self, job_no: int, job_count: int, sampling_steps: int) -> None:
        """A new batch (A1111's "job" within a request): resets the step counter (a skip is used up when check()
        raises it, so one pressed late in the last batch's final step still reaches this one)."""
        self.job_no, self.job_count = job_no, job_count
        self.batch_fraction, self.sampling_step, self.sampling_steps = 0.0, 0, sampling_steps
        self.textinfo = f"Batch {job_no + 1} of {job_count}"

    def report(self, batch_fraction: float, latent: torch.Tensor | None = None) -> None:
        """The current batch is `batch_fraction` (0..1) done; `latent`: its denoised estimate [B, C, h, w]."""
        self.batch_fraction = batch_fraction
        self.sampling_step = round(batch_fraction * self.sampling_steps)
        if latent is not None:
            self.latent = latent[0].detach().float().cpu()
            self.latent_version += 1

    def check(self) -> None:
        """Raises ServerStopping / Interrupted / Skipped when the server or the user asked for it; jobs call it
        between units of work (generate() between UNet layers)."""
        if self.stopping:
            raise ServerStopping()
        if self.interrupted:
            raise Interrupted()
        if self.skipped:
            self.skipped = False  # one skip drops one batch: generate() goes on with the next
            raise Skipped()

    @property
    def fraction(self) -> float:
        return min((self.job_no + self.batch_fraction) / max(self.job_count, 1), 1.0)


@dataclass
class Job:
    run: Callable[[JobControl], Any]
    task_id: str
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.time)


class Worker:
    """The generation thread. `submit(fn)` queues fn(control) and returns its Job, whose future gets the result.

    Runs `fn`s strictly in submission order. `interrupt()` / `skip()` act on the running job only (as A1111's buttons
    do); queued jobs are untouched. `interrupt(task_id)` stops one task wherever it is: running, queued, or not yet
    submitted (a request still being read when its cancellation arrives, as the page's Live mode sends them).
    """

    def __init__(self):
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: list[Job] = []  # queued, not yet started, oldest first
        self._finished: dict[str, bool] = {}  # task id -> True once done (bounded below)
        self._interrupted: dict[str, bool] = {}  # ids of tasks interrupted before they started (bounded below)
        self.current: Job | None = None
        self.control: JobControl | None = None
        self._thread = threading.Thread(target=self._loop, name="generation-worker", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[JobControl], Any], task_id: str | None = None) -> Job:
        with self._lock:
            job = Job(run, task_id or f"task({uuid.uuid4().hex[:15]})")
            self._pending.append(job)
            self._queue.put(job)
        return job

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                if job not in self._pending:
                    continue  # failed by stop() while it waited
                self._pending.remove(job)
                if not job.future.set_running_or_notify_cancel():
                    continue
                self.current, self.control = job, JobControl(job)
                # Interrupted before it started: the job stops at its first check, with A1111's interrupted answer.
                self.control.interrupted = self._interrupted.pop(job.task_id, False)
            result, error = None, None
            try:
                result = job.run(self.control)
            except BaseException as caught:  # the job's own error goes to the request that waits for it
                error = caught
            # Finished before it is answered: a client that has its answer sees the job completed and the server idle.
            with self._lock:
                self._finished[job.task_id] = True
                while len(self._finished) > 1000:
                    self._finished.pop(next(iter(self._finished)))
                self.current, self.control = None, None
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)

    def interrupt(self, task_id: str | None = None) -> None:
        """Interrupt the running job; with `task_id`, that task only: now if it runs, else as soon as it starts."""
        with self._lock:
            if self.control and task_id in (None, self.current.task_id):
                self.control.interrupted = True
            elif task_id is not None and task_id not in self._finished:
                self._interrupted[task_id] = True
                while len(self._interrupted) > 1000:
                    self._interrupted.pop(next(iter(self._interrupted)))

    def skip(self) -> None:
        with self._lock:
            if self.control:
                self.control.skipped = True

    def queued(self) -> int:
        with self._lock:
            return len(self._pending)

    def position(self, task_id: str) -> tuple[str, int]:
        """("running" | "queued" | "finished" | "unknown", number of jobs ahead of it in the queue)."""
        with self._lock:
            if self.current and self.current.task_id == task_id:
                return "running", 0
            for ahead, job in enumerate(self._pending):
                if job.task_id == task_id:
                    return "queued", ahead + (self.current is not None)
            return ("finished" if task_id in self._finished else "unknown"), 0

    def stop(self, timeout: float = 30) -> None:
        """Fail the queued jobs and the running one with ServerStopping (the running one at its next check, within
        a UNet layer's time) and end the thread; waits up to `timeout` seconds for it (0: not at all)."""
        with self._lock:
            for job in self._pending:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(ServerStopping())
            self._pending.clear()
            if self.control:
                self.control.stopping = True
        self._queue.put(None)
        self._thread.join(timeout=timeout)
