"""Continuous batching: the decode steps of all active requests run as one batch through the model.

Streaming experts makes single-stream decode I/O-bound; in a batch each MoE layer fetches the union
of the rows' experts once (`experts_forward` already reads a multi-token step's union once), so
concurrent requests share every expert read. Requests join and leave between steps:

- a new request is prefilled alone, one 256-token chunk between decode steps (long prompts do not
  stall the others), into its own KV cache;
- it then joins the batch: its cache and the batch's are left-padded to the same length and stacked,
  with an attention mask hiding the padding and per-row position ids (what transformers' own batched
  `generate` does with left padding);
- rows that finish or whose client went away are dropped, and padding no row needs is trimmed.

Only caches made of plain `DynamicLayer`s can be stacked like this; models with sliding-window or
linear-attention layers are served one request at a time (the others wait in the queue).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .budget import PREFILL_CHUNK
from .generate import Sampling, accepts_logits_to_keep, sample
from .text import TextStream

Emit = Callable[[str, "str | None"], None]  # (text piece, finish reason or None); finish "error": piece is the message


class QueueFull(Exception):
    """More requests than slots and queue places: the caller should retry later (HTTP 429)."""


@dataclass(eq=False)
class Request:
    ids: list[int]  # the prompt
    max_tokens: int
    sampling: Sampling
    text: TextStream
    emit: Emit
    eos: set[int] = field(default_factory=set)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos or a stop string), "length", "cancelled", "error"
    cancelled: bool = False
    prefilled: int = 0
    cache: DynamicCache | None = None  # its own KV cache while it prefills
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None

    def __post_init__(self):
        if self.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling.seed)


def batchable(config) -> bool:
    """Whether this model's KV cache can be stacked across requests (see the module docstring)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(t, (0, 0, length - t.shape[-2], 0)) if t.shape[-2] < length else t


class Batch:
    """The requests decoding together: one left-padded KV cache and the mask of its real positions."""

    def __init__(self):
        self.requests: list[Request] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cached positions], True where a real token is

    def __len__(self) -> int:
        return len(self.requests)

    def add(self, request: Request, cache: DynamicCache) -> None:
        length = cache.get_seq_length()
        mask = torch.ones(1, length, dtype=torch.bool, device=cache.layers[0].keys.device)
        if not self.requests:
            self.requests, self.cache, self.mask = [request], cache, mask
            return
        n = max(length, self.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, n), _pad_left(theirs.keys, n)])
            mine.values = torch.cat([_pad_left(mine.values, n), _pad_left(theirs.values, n)])
        self.mask = torch.cat([F.pad(self.mask, (n - self.mask.shape[1], 0)), F.pad(mask, (n - length, 0))])
        self.requests.append(request)

    def keep(self, rows: list[int]) -> None:
        """Drop every other row, and the leading positions that are padding in all the rows left."""
        if len(rows) == len(self.requests):
            return
        if not rows:
            self.requests, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        first = int(mask.any(0).nonzero()[0])
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:].contiguous()
            layer.values = layer.values[index, :, first:].contiguous()
        self.mask = mask[:, first:]
        self.requests = [self.requests[i] for i in rows]

    def step(self, model, extra: dict) -> torch.Tensor:
        """Feed each row its last token; the next-token logits, one row per request."""
        device = self.mask.device
        tokens = torch.tensor([[r.generated[-1]] for r in self.requests], device=device)
        padded = not bool(self.mask.all())
        self.mask = F.pad(self.mask, (0, 1), value=True)
        if padded:  # else: exactly the single-request call (same code path, same bits)
            positions = torch.tensor([[len(r.ids) + len(r.generated) - 1] for r in self.requests], device=device)
            extra = {**extra, "attention_mask": self.mask, "position_ids": positions}
        out = model(input_ids=tokens, cache=self.cache, use_cache=True, **extra)
        return out.logits[:, -1]


@dataclass
class EngineStats:
    """Totals since start, for /metrics."""

    requests: dict[str, int] = field(default_factory=dict)  # by finish reason
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=4096), repr=False)  # (time, tokens) for tokens/s

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        n = sum(k for t, k in self.recent if now - t <= window)
        return n / window


class Engine:
    """One thread owns the model; requests come in through `submit` from any thread."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 32):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, got {max_batch} and {max_queue}")
        self.model = model  # a StreamedModel
        self.can_batch = batchable(model.model.config)
        self.max_batch = max_batch if self.can_batch else 1
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()
        self.current: Request | None = None  # the request being prefilled
        self.batch = Batch()
        self.stats = EngineStats()
        self._extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model.model) else {}
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="moestream-engine", daemon=True)
        self._thread.start()

    # -- called from other threads ------------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self._cv:
            if self.active + len(self.waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.active} requests running and {len(self.waiting)} waiting "
                                f"(--max-batch {self.max_batch}, --max-queue {self.max_queue})")
            self.waiting.append(request)
            self._cv.notify()

    def cancel(self, request: Request) -> None:
        """The client went away: free its slot at the next step."""
        with self._cv:
            request.cancelled = True
            if request in self.waiting:
                self.waiting.remove(request)
                self._count("cancelled")
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        return len(self.batch) + (self.current is not None)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # -- the engine thread ---------------------------------------------------------------------
    def _count(self, reason: str) -> None:
        self.stats.requests[reason] = self.stats.requests.get(reason, 0) + 1

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self.waiting or self.current or self.batch.requests):
                    self._cv.wait()
                if self._stopping:
                    return
                if self.current is None and self.waiting and len(self.batch) < self.max_batch:
                    self.current = self.waiting.popleft()
            try:
                with torch.inference_mode():
                    if self.current is not None:
                        self._prefill_chunk()
                    if self.batch.requests:
                        self._decode_step()
            except Exception as e:  # fail the requests involved, keep serving
                traceback.print_exc()
                failed = [*self.batch.requests, *([self.current] if self.current else [])]
                self.batch.keep([])
                self.current = None
                for r in failed:
                    self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _finish(self, r: Request, reason: str, piece: str = "") -> None:
        r.finish_reason = reason
        r.cache = None
        self._count(reason)
        r.emit(piece, reason)

    def _accept(self, r: Request, token: int) -> bool:
        """Record a sampled token and send its text; whether the request goes on."""
        r.generated.append(token)
        self.stats.generated_tokens += 1
        self.stats.recent.append((time.monotonic(), 1))
        piece = "" if token in r.eos else r.text.add(token)
        if token in r.eos or r.text.stopped is not None:
            reason = "stop"
        elif len(r.generated) >= r.max_tokens:
            reason = "length"
        else:
            if piece:
                r.emit(piece, None)
            return True
        self._finish(r, reason, piece + r.text.finish())
        return False

    def _prefill_chunk(self) -> None:
        r = self.current
        if r.cancelled:
            self.current = None
            self._finish(r, "cancelled")
            return
        t0 = time.perf_counter()
        if r.cache is None:
            r.cache = DynamicCache(config=self.model.model.config)
        device = self.model.device
        chunk = torch.tensor([r.ids[r.prefilled:r.prefilled + PREFILL_CHUNK]], device=device)
        out = self.model.model(input_ids=chunk, cache=r.cache, use_cache=True, **self._extra)
        r.prefilled += chunk.shape[1]
        self.stats.prefill_seconds += time.perf_counter() - t0
        if r.prefilled < len(r.ids):
            return
        self.stats.prompt_tokens += len(r.ids)
        r.first_token = time.monotonic()
        if self._accept(r, sample(out.logits[0, -1], r.sampling, r.generator)):
            cache, r.cache = r.cache, None
            self.batch.add(r, cache)
        self.current = None  # after joining the batch: `active` never undercounts

    def _decode_step(self) -> None:
        live = [i for i, r in enumerate(self.batch.requests) if not r.cancelled]
        for r in self.batch.requests:
            if r.cancelled:
                self._finish(r, "cancelled")
        self.batch.keep(live)
        if not self.batch.requests:
            return
        t0 = time.perf_counter()
        logits = self.batch.step(self.model.model, self._extra)
        keep = [i for i, (r, row) in enumerate(zip(self.batch.requests, logits))
                if self._accept(r, sample(row, r.sampling, r.generator))]
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(self.batch)
        self.batch.keep(keep)
        self.stats.decode_seconds += time.perf_counter() - t0
