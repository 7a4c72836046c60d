"""Continuous batching over an exported step graph: one thread owns the engine; requests join the running batch
at the next step and leave it as soon as they finish or their client goes away.

Every row keeps exactly the cache columns, positions and mask it would have alone: prompts are left-padded with
masked columns (as DataCollator does), and when batches merge, the shorter rows' unused tail columns are masked
(attention does not depend on column order), so greedy answers equal one-by-one
answers. Work per engine call: newcomers are prefilled together (one call), then merged into the batch; otherwise
the whole batch decodes one token (one call). Merging and dropping rows copy the caches; plain decode steps do not
(the step graph returns only the new columns, written into the batch's cache in place).
"""
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from glm_tune.deployment.kv_cache import KVCache, widen
from glm_tune.sampling import Sampling, choose_next, penalize
from glm_tune.deployment.step_feeds import append_step

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """One completion in the scheduler. The callbacks run on the scheduler thread: `on_token(id)` for each answer
    token, then exactly one of `on_finish(reason)` ("stop": a stop token, "length": max_tokens) or
    `on_error(message)`. `cancel()` may be called from any thread; the row leaves at the next step."""
    prompt_ids: List[int]
    max_tokens: int
    on_token: Callable[[int], None]
    on_finish: Callable[[str], None]
    on_error: Callable[[str], None]
    sampling: Sampling = field(default_factory=Sampling)
    tokens: List[int] = field(default_factory=list)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.rng = np.random.RandomState(self.sampling.seed if self.sampling.seed is not None else
                                         np.random.randint(2 ** 31))

    def cancel(self) -> None:
        self.cancelled = True  # a plain attribute write: atomic, read by the scheduler between steps


class ServerBusy(Exception):
    """The waiting queue is full."""


class RunningBatch:
    """The rows being decoded and their shared step state: `valid` [B, T] marks each row's real cache columns
    (T = cache.length), `positions` the last position of each row, `next_tokens` what each row feeds next."""

    def __init__(self, requests, valid, positions, next_tokens, cache: KVCache):
        self.requests, self.valid, self.positions = list(requests), valid, positions
        self.next_tokens, self.cache = np.asarray(next_tokens, dtype="int64"), cache

    def __len__(self):
        return len(self.requests)

    def merge(self, other: "RunningBatch") -> "RunningBatch":
        """Both batches as one: each row keeps its columns from the first, the shorter side's tail is masked."""
        cache = self.cache.merge(other.cache)
        valid = np.concatenate([widen(self.valid, cache.length), widen(other.valid, cache.length)], axis=0)
        return RunningBatch(self.requests + other.requests, valid,
                            np.concatenate([self.positions, other.positions]),
                            np.concatenate([self.next_tokens, other.next_tokens]), cache)

    def keep(self, rows: List[int]) -> Optional["RunningBatch"]:
        """Only `rows`, without the cache columns none of them uses any more (None when no row is left)."""
        if not rows:
            return None
        valid = self.valid[rows]
        unused = int(np.argmax(valid.any(axis=0)))  # leading columns masked in every row left
        return RunningBatch([self.requests[i] for i in rows], valid[:, unused:], self.positions[rows],
                            self.next_tokens[rows], self.cache.select(rows, unused))


class Scheduler:
    """Owns the engine on one thread. `submit` queues a Request; the loop admits waiting requests whenever the
    batch has room (up to `max_batch` rows), prefills them together and decodes the whole batch one token per
    engine call."""

    def __init__(self, engine, feeds, stop_ids, max_batch: int = 8, max_waiting: int = 64):
        self.engine, self.feeds, self.stop_ids = engine, feeds, set(stop_ids)
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.waiting: "queue.Queue[Request]" = queue.Queue()
        self.batch: Optional[RunningBatch] = None
        self.stats = {"requests": 0, "tokens": 0, "engine_calls": 0, "engine_seconds": 0.0, "largest_batch": 0}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="glm-tune-scheduler", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.waiting.put(None)  # wakes an idle loop
        self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        if self.waiting.qsize() >= self.max_waiting:
            raise ServerBusy(f"{self.waiting.qsize()} requests are already waiting (--max_waiting "
                             f"{self.max_waiting}); retry later")
        self.stats["requests"] += 1
        self.waiting.put(request)

    @property
    def running(self) -> int:
        batch = self.batch
        return len(batch) if batch is not None else 0

    # ------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stopping:
            newcomers = self._admit()
            try:
                if newcomers:
                    self._prefill(newcomers)
                elif self.batch is not None:
                    self._decode()
            except Exception as err:  # an engine failure ends the requests it touched, never the server
                logger.exception("engine step failed")
                for request in newcomers + (self.batch.requests if self.batch is not None else []):
                    request.on_error(f"the engine failed: {str(err).splitlines()[0][:200] if str(err) else err!r}")
                self.batch = None
            self._drop_finished()

    def _admit(self) -> List[Request]:
        """Waiting requests that fit in the batch (blocks while there is nothing to do)."""
        room = self.max_batch - self.running
        admitted = []
        while room > 0:
            try:
                block = self.batch is None and not admitted
                request = self.waiting.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                break
            if request is None:  # stop() woke us
                break
            if request.cancelled:
                continue
            admitted.append(request)
            room -= 1
        return admitted

    def _prefill(self, requests: List[Request]) -> None:
        feeds = self.feeds.prefill([r.prompt_ids for r in requests])
        logits, *new_columns = self._run(feeds)
        chosen = self._choose(logits, requests)
        cache = self.feeds.cache
        valid = append_step(cache, self.feeds.valid, new_columns)
        newcomers = RunningBatch(requests, valid, feeds["position_ids"][..., -1:], chosen, cache)
        self._deliver(newcomers)
        self.batch = newcomers if self.batch is None else self.batch.merge(newcomers)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self.batch))

    def _decode(self) -> None:
        batch = self.batch
        feeds = self.feeds.next_feeds(batch.valid, batch.positions, batch.next_tokens, batch.cache)
        logits, *new_columns = self._run(feeds)
        batch.valid = append_step(batch.cache, batch.valid, new_columns)
        batch.positions = feeds["position_ids"][..., -1:]
        batch.next_tokens = self._choose(logits, batch.requests)
        self._deliver(batch)

    def _run(self, feeds):
        started = time.perf_counter()
        outputs = self.engine(feeds)
        self.stats["engine_calls"] += 1
        self.stats["engine_seconds"] += time.perf_counter() - started
        return outputs

    def _choose(self, logits: np.ndarray, requests: List[Request]) -> np.ndarray:
        for row, request in enumerate(requests):
            if request.sampling.penalized and request.tokens:
                logits[row] = penalize(logits[row], request.tokens, request.sampling)
        return np.asarray([choose_next(logits[row:row + 1], request.rng, request.sampling)[0]
                           for row, request in enumerate(requests)], dtype="int64")

    def _deliver(self, batch: RunningBatch) -> None:
        """Hand each row its new token, or finish it at a stop token or its max_tokens."""
        for request, token in zip(batch.requests, batch.next_tokens):
            if request.cancelled:
                continue
            token = int(token)
            if token in self.stop_ids:
                request.cancelled = True
                request.on_finish("stop")
                continue
            request.tokens.append(token)
            self.stats["tokens"] += 1
            request.on_token(token)
            if len(request.tokens) >= request.max_tokens:
                request.cancelled = True
                request.on_finish("length")

    def _drop_finished(self) -> None:
        batch = self.batch
        if batch is None:
            return
        rows = [i for i, r in enumerate(batch.requests) if not r.cancelled]
        if len(rows) != len(batch):
            self.batch = batch.keep(rows)
