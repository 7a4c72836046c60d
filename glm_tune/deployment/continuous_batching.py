"""Continuous batching over an exported step graph: one thread owns the engine; requests join the running batch
at the next step and leave it as soon as they finish or their client goes away.

Every row keeps exactly the cache columns, positions and mask it would have alone: prompts are left-padded with
masked columns (as DataCollator does), and when batches merge, the shorter rows' unused tail columns are masked
(attention does not depend on column order), so greedy answers equal one-by-one
answers. Work per engine call: newcomers are prefilled together (one call), then merged into the batch; otherwise
the whole batch decodes one token (one call). Merging and dropping rows copy the caches; plain decode steps do not
(the step graph returns only the new columns, written into the batch's cache in place).

Two things make a step do more than one token's work, neither changing a greedy answer:
- the prefix cache (prefix_cache.py): a newcomer whose prompt starts with blocks an earlier request left is
  prefilled from those columns, only its new end run by the engine;
- speculative steps (prompt_lookup.py, `speculative` drafts): rows propose the tokens that followed their latest
  n-gram earlier in prompt + answer, the batch verifies them in one call over [next token, drafts], each row keeps
  the drafts the model agrees with (greedy) or the speculative-sampling rule keeps (sampling) plus the model's own
  next token, and the rest of its new columns are masked (dropped from the cache when every row has dropped them).
infer_generation.py runs the same scheduler on its own thread (`run_until_idle`), so infer and serve answer alike.
"""
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from glm_tune.deployment.kv_cache import KVCache, widen
from glm_tune.deployment.prefix_cache import CACHEABLE, PrefixCache
from glm_tune.deployment.prompt_lookup import PromptLookup, accept_drafts
from glm_tune.deployment.step_feeds import append_step
from glm_tune.sampling import Sampling, choose_next

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
    lookup: Optional[PromptLookup] = field(default=None, repr=False)  # made at the first speculative step

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
    engine call (several with `speculative` > 0, from the drafts the rows' answers agree with). `prefix_cache`:
    a PrefixCache reused across requests (ChatGLM2/3)."""

    def __init__(self, engine, feeds, stop_ids, max_batch: int = 8, max_waiting: int = 64, speculative: int = 0,
                 prefix_cache: Optional[PrefixCache] = None):
        self.engine, self.feeds, self.stop_ids = engine, feeds, set(stop_ids)
        self.max_batch, self.max_waiting, self.speculative = max_batch, max_waiting, speculative
        self.prefix_cache = prefix_cache if feeds is not None and feeds.generation in CACHEABLE else None
        self.waiting: "queue.Queue[Request]" = queue.Queue()
        self.batch: Optional[RunningBatch] = None
        self.stats = {"requests": 0, "tokens": 0, "engine_calls": 0, "engine_seconds": 0.0, "largest_batch": 0,
                      "prefill_calls": 0, "prefill_seconds": 0.0, "decode_calls": 0, "decode_seconds": 0.0,
                      "decode_tokens": 0, "drafted": 0, "accepted": 0}
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

    def summary(self) -> dict:
        """What /health and infer's log report: engine time split into prefill and decode, speculation's
        acceptance, the prefix cache."""
        stats = dict(self.stats)
        stats["acceptance"] = round(stats["accepted"] / stats["drafted"], 3) if stats["drafted"] else None
        if self.prefix_cache is not None:
            stats["prefix_cache"] = self.prefix_cache.summary()
        return stats

    # ------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stopping:
            self._step(block=True)

    def run_until_idle(self) -> None:
        """Serve every submitted request on the calling thread (the scheduler's own thread not started): returns
        once none is waiting or running."""
        while self.batch is not None or not self.waiting.empty():
            self._step(block=False)

    def _step(self, block: bool) -> None:
        newcomers = self._admit(block)
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

    def _admit(self, block: bool = True) -> List[Request]:
        """Waiting requests that fit in the batch (with `block`, waits while there is nothing to do)."""
        room = self.max_batch - self.running
        admitted = []
        while room > 0:
            try:
                wait = block and self.batch is None and not admitted
                request = self.waiting.get(block=wait, timeout=0.5 if wait else None)
            except queue.Empty:
                break
            if request is None:  # stop() woke us
                break
            if request.cancelled:
                continue
            admitted.append(request)
            room -= 1
        return admitted

    # --------------------------------------------------------------------------------------- prefilling

    def _prefill(self, requests: List[Request]) -> None:
        fresh = []
        for request in requests:
            found, cache = (self.prefix_cache.lookup(request.prompt_ids, len(request.prompt_ids) - 1)
                            if self.prefix_cache is not None else (0, None))
            if found:
                self._join(self._prefill_rest(request, found, cache))
            else:
                fresh.append(request)
        if fresh:
            feeds = self.feeds.prefill([r.prompt_ids for r in fresh])
            logits, *new_columns = self._run(feeds, "prefill")
            cache = self.feeds.cache
            valid = append_step(cache, self.feeds.valid, new_columns)
            self._join(RunningBatch(fresh, valid, feeds["position_ids"][..., -1:],
                                    self._choose(logits[:, -1], fresh), cache))

    def _prefill_rest(self, request: Request, found: int, cache: KVCache) -> "RunningBatch":
        """A prompt whose first `found` tokens' columns came from the prefix cache: the engine runs the rest."""
        rest = np.asarray([request.prompt_ids[found:]], dtype="int64")
        valid = np.ones((1, found), dtype="int64")
        feeds = self.feeds.extend_feeds(valid, np.asarray([[found - 1]], dtype="int64"), rest,
                                        np.ones(rest.shape, dtype="int64"), cache)
        logits, *new_columns = self._run(feeds, "prefill")
        valid = append_step(cache, valid, new_columns)
        return RunningBatch([request], valid, feeds["position_ids"][..., -1:], self._choose(logits[:, -1], [request]),
                            cache)

    def _join(self, newcomers: "RunningBatch") -> None:
        for request, token in zip(newcomers.requests, newcomers.next_tokens):
            self._deliver(request, [int(token)])
        self.batch = newcomers if self.batch is None else self.batch.merge(newcomers)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self.batch))

    # ------------------------------------------------------------------------------------------ decoding

    def _drafts(self, batch: "RunningBatch") -> List[List[int]]:
        """Each row's drafts (prompt lookup), as many as the row still has room for."""
        drafts = []
        for request in batch.requests:
            room = request.max_tokens - len(request.tokens) - 1  # the model's own token always comes too
            if self.speculative <= 0 or room <= 0 or request.cancelled:
                drafts.append([])
            else:
                if request.lookup is None:
                    request.lookup = PromptLookup(request.prompt_ids)
                request.lookup.extend(request.tokens[len(request.lookup.sequence) - len(request.prompt_ids):])
                drafts.append(request.lookup.propose(min(self.speculative, room)))
        return drafts

    def _decode(self) -> None:
        batch = self.batch
        drafts = self._drafts(batch)
        if any(drafts):
            self._verify(batch, drafts)
            return
        feeds = self.feeds.next_feeds(batch.valid, batch.positions, batch.next_tokens, batch.cache)
        logits, *new_columns = self._run(feeds, "decode")
        self.stats["decode_tokens"] += len(batch)
        batch.valid = append_step(batch.cache, batch.valid, new_columns)
        batch.positions = feeds["position_ids"][..., -1:]
        batch.next_tokens = self._choose(logits[:, -1], batch.requests)
        for request, token in zip(batch.requests, batch.next_tokens):
            self._deliver(request, [int(token)])

    def _verify(self, batch: "RunningBatch", drafts: List[List[int]]) -> None:
        """One call over each row's [next token, drafts] (left-padded to the longest); each row keeps its
        agreed drafts and the model's next token, its other new columns are masked, and columns no row uses any
        more are dropped from the cache's end."""
        steps = 1 + max(len(d) for d in drafts)
        tokens = np.zeros((len(batch), steps), dtype="int64")
        real = np.zeros((len(batch), steps), dtype="int64")
        for row, (token, row_drafts) in enumerate(zip(batch.next_tokens, drafts)):
            fed = [int(token)] + row_drafts
            tokens[row, steps - len(fed):], real[row, steps - len(fed):] = fed, 1
        feeds = self.feeds.extend_feeds(batch.valid, batch.positions, tokens, real, batch.cache, num_logits=steps)
        logits, *new_columns = self._run(feeds, "decode")
        valid = append_step(batch.cache, batch.valid, new_columns)
        first = valid.shape[1] - steps  # the step's first column
        emitted, last_kept = [], np.zeros(len(batch), dtype="int64")
        for row, (request, row_drafts) in enumerate(zip(batch.requests, drafts)):
            start = steps - 1 - len(row_drafts)  # the row's fed token
            kept, token = accept_drafts(logits[row, start:], row_drafts, request.rng, request.sampling, request.tokens)
            valid[row, first:] = 0
            valid[row, first + start:first + start + 1 + kept] = 1  # the fed token and the kept drafts
            last_kept[row] = start + kept
            self.stats["drafted"] += len(row_drafts)
            self.stats["accepted"] += kept
            if row_drafts:
                request.lookup.verified(len(row_drafts), kept)
            emitted.append(row_drafts[:kept] + [token])
        # each row's last position is that of its last kept token (whatever the generation's position layout)
        positions = feeds["position_ids"]
        batch.positions = np.take_along_axis(positions, last_kept.reshape((-1,) + (1,) * (positions.ndim - 1)), -1)
        batch.next_tokens = np.asarray([e[-1] for e in emitted], dtype="int64")
        batch.valid = self._trim(batch.cache, valid)
        self.stats["decode_tokens"] += sum(len(e) for e in emitted)
        for request, tokens_of_row in zip(batch.requests, emitted):
            self._deliver(request, tokens_of_row)

    @staticmethod
    def _trim(cache: KVCache, valid: np.ndarray) -> np.ndarray:
        """Columns at the cache's end that no row uses (rejected drafts) go: the next step writes over them."""
        used = np.flatnonzero(valid.any(axis=0))
        length = int(used[-1]) + 1 if len(used) else 0
        cache.length = length
        return valid[:, :length]

    def _run(self, feeds, kind: str):
        started = time.perf_counter()
        outputs = self.engine(feeds)
        seconds = time.perf_counter() - started
        self.stats["engine_calls"] += 1
        self.stats["engine_seconds"] += seconds
        self.stats[f"{kind}_calls"] += 1
        self.stats[f"{kind}_seconds"] += seconds
        return outputs

    @staticmethod
    def _choose(logits: np.ndarray, requests: List[Request]) -> np.ndarray:
        """Each row's next token from its [B, V] logits."""
        return np.asarray([choose_next(logits[row], request.rng, request.sampling, request.tokens)
                           for row, request in enumerate(requests)], dtype="int64")

    def _deliver(self, request: Request, tokens: List[int]) -> None:
        """Hand a row its new tokens in order, finishing it at a stop token or its max_tokens."""
        for token in tokens:
            if request.cancelled:
                return
            if token in self.stop_ids:
                request.cancelled = True
                request.on_finish("stop")
                return
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
            if self.prefix_cache is not None:
                for row, request in enumerate(batch.requests):
                    if request.cancelled:
                        columns = np.flatnonzero(batch.valid[row])
                        self.prefix_cache.store(request.prompt_ids + request.tokens, batch.cache, row, columns)
            self.batch = batch.keep(rows)
