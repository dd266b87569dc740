"""The static micro-batcher of `medpipe serve`: one worker thread owns the model, takes every waiting
request and generates each group of them (greedy with the same settings) as one batched generate;
a sampled request is a group of its own. A request whose client left (`Job.gone`) is skipped, or
ends at the next step of the generate it is in."""
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from medpipe.commands.serve_requests import ApiError


@dataclass
class Job:
    prompt: str | list
    gen: dict
    deadline: float
    ids: list | None = None  # the prompt's tokens when the limit check encoded it (not encoded twice)
    opts: dict = field(default_factory=dict)  # stop, logprobs, echo, strip (generate_ids' serving options)
    future: Future = field(default_factory=Future)
    gone: threading.Event = field(default_factory=threading.Event)  # set: its client left, stop generating it

    @property
    def group(self) -> tuple:
        """Jobs with one group key can share a batch: greedy with the same settings. A sampled job
        is a group of its own (a shared batch would share its random stream)."""
        if self.gen["temperature"] > 0:
            return ("sampled", id(self))
        return ("greedy", self.gen["max_new_tokens"], self.gen.get("max_length"), tuple(sorted(self.opts.items())))


class Batcher:
    """One worker thread owns the model: it takes every waiting job and generates each group of them
    as one batch (micro-batching), so N concurrent requests cost about one batched generate."""

    def __init__(self, model: Any, max_batch: int = 32, max_queue: int = 256, gather: float = 0.02):
        self.model, self.max_batch, self.gather = model, max(1, max_batch), gather
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max(1, max_queue))
        self.batches = 0
        # requests read and being tokenised: about to be submitted, so worth a short wait for
        self.preparing = 0
        self.counter = threading.Lock()
        self.last_size = 1  # jobs the last round took: under steady load, as many come back
        threading.Thread(target=self._work, name="medpipe-batcher", daemon=True).start()

    def arriving(self, delta: int) -> None:
        with self.counter:
            self.preparing += delta

    def submit(self, prompt: str | list, gen: dict, timeout: float, ids: list | None = None,
               opts: dict | None = None) -> Job:
        job = Job(prompt, gen, time.monotonic() + timeout, ids, dict(opts or {}))
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({self.jobs.maxsize} requests waiting); retry later",
                           "server_busy") from None
        return job

    def _work(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            until = time.monotonic() + self.gather
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.jobs.get_nowait())
                    continue
                except queue.Empty:
                    pass
                # wait up to `gather` s for requests being tokenised, and for as many as the last round
                # had (clients answered then send their next one): full batches under steady load
                if self.preparing <= 0 and len(jobs) >= self.last_size or time.monotonic() >= until:
                    break
                time.sleep(0.001)
            self.last_size = len(jobs)
            now = time.monotonic()
            live = []
            for job in jobs:
                if job.gone.is_set() or job.future.cancelled() or not job.future.set_running_or_notify_cancel():
                    continue
                if now > job.deadline:  # waited out its timeout in the queue: do not generate it
                    job.future.set_exception(ApiError(503, "the request timed out waiting for the model", "timeout"))
                    continue
                live.append(job)
            groups: dict[tuple, list[Job]] = {}
            for job in live:
                groups.setdefault(job.group, []).append(job)
            for group in groups.values():
                for b0 in range(0, len(group), self.max_batch):
                    self._generate(group[b0:b0 + self.max_batch])

    def _generate(self, batch: list[Job]) -> None:
        gen = dict(batch[0].gen)
        if gen.get("max_length") is None:
            gen.pop("max_length", None)
        # stop strings, logprobs, echo as asked; every row ends at the next step once its client left
        gen.update(batch[0].opts, cancel=[j.gone for j in batch])
        try:
            if all(j.ids is not None for j in batch) and hasattr(self.model, "generate_ids"):
                out = self.model.generate_ids([j.ids for j in batch], batch_size=len(batch), **gen)
            else:
                out = self.model.generate([j.prompt for j in batch], batch_size=len(batch), **gen)
            self.batches += 1
        except BaseException as e:  # every waiting request learns of it
            for j in batch:
                j.future.set_exception(e)
            return
        for j, c in zip(batch, out):
            j.future.set_result(c)


