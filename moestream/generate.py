"""The generation loop: chunked prefill, token-by-token decode, sampling, and the numbers users ask for."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from .budget import PREFILL_CHUNK, peak_rss_bytes
from .cache import Counters, ExpertCache
from .sizes import format_size


@dataclass
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    if s.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1:
        p, idx = torch.sort(probs, descending=True)
        drop = p.cumsum(0) - p > s.top_p  # keep the smallest prefix whose mass reaches top_p
        probs = probs.scatter(0, idx[drop], 0.0)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class GenerationStats:
    load_seconds: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_budget: int = 0
    experts_format: str = "none"  # the store's expert quantisation ("none": exact)
    dense_format: str = "none"  # the store's dense quantisation ("none": exact)
    activations: str = "float"  # "int8": one-token experts with int8-rounded activations (lossy, opt-in)
    prefill: Counters = field(default_factory=Counters)
    decode: Counters = field(default_factory=Counters)
    layers: dict[int, Counters] = field(default_factory=dict)  # whole run, per MoE layer
    decode_disk_busy_seconds: float = 0.0  # decode time with at least one expert read in flight
    peak_rss: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        n = self.generated_tokens - 1  # the first token comes out of prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0

    @property
    def io(self) -> Counters:
        return self.prefill + self.decode

    def to_dict(self) -> dict:
        io = self.io
        d = asdict(self)
        d.update(prefill_tps=self.prefill_tps, decode_tps=self.decode_tps, hit_rate=io.hit_rate,
                 decode_disk_busy_share=self.decode_disk_busy_share,
                 bytes_read=io.bytes_read, read_mb_s=self.read_mb_s, io_wait_share=self.io_wait_share,
                 decode_bytes_per_token=self.decode.bytes_read / max(1, self.generated_tokens - 1))
        return d

    @property
    def read_mb_s(self) -> float:
        io = self.io
        return io.bytes_read / io.wait_seconds / 1e6 if io.wait_seconds else 0.0

    @property
    def decode_disk_busy_share(self) -> float:
        """Share of decode time the SSD had a read of ours in flight (1.0: decode ran at the disk's speed)."""
        return self.decode_disk_busy_seconds / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def io_wait_share(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.io.wait_seconds / total if total else 0.0

    def format(self) -> str:
        io = self.io
        per_tok = self.decode.bytes_read / max(1, self.generated_tokens - 1)
        return "\n".join([
            "── moestream ─────────────────────────────────────────────",
            f"load                 {self.load_seconds:.2f} s",
            f"prompt               {self.prompt_tokens} tokens, prefill {self.prefill_tps:.1f} tok/s, "
            f"time to first token {self.ttft_seconds:.2f} s",
            f"generated            {self.generated_tokens} tokens, decode {self.decode_tps:.2f} tok/s",
            *([f"experts format       {self.experts_format} (LOSSY: "
               f"{'as quantised in the GGUF file' if self.experts_format.startswith('gguf') else 'quantised at convert'})"]
              if self.experts_format != "none" else []),
            *([f"dense format         {self.dense_format} " + ("(exact: the checkpoint's FP8, kept as stored)"
                if self.dense_format.startswith("fp8") else "(LOSSY: quantised at convert)")]
              if self.dense_format != "none" else []),
            *([f"activations          {self.activations} (LOSSY: rounded per block of 32 in one-token experts, "
               "--activations)"] if self.activations != "float" else []),
            f"expert cache         {format_size(self.cache_budget)}, hit rate {100 * io.hit_rate:.1f} % "
            f"({io.hits} hits, {io.misses} misses, {io.evictions} evictions)",
            f"read                 {io.bytes_read / 1e9:.3f} GB ({format_size(per_tok)}/decoded token), "
            f"{self.read_mb_s:.0f} MB/s while waiting",
            f"I/O wait             {100 * self.io_wait_share:.0f} % of generation time; disk busy "
            f"{100 * self.decode_disk_busy_share:.0f} % of decode time",
            *([f"prefetch             {io.prefetched} reads started early, {io.prefetch_used} used "
               f"({100 * io.prefetch_used / io.prefetched:.0f} % accurate), {io.prefetch_cancelled} guesses "
               "dropped before their read"] if io.prefetched else []),
            f"peak RSS             {format_size(self.peak_rss)}",
        ])


def accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def generate_ids(model: PreTrainedModel, ids: list[int], max_new_tokens: int, sampling: Sampling,
                 cache: ExpertCache, stats: GenerationStats, eos: set[int], recorder=None) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids after prompt `ids`, filling `stats` as it goes."""
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        return
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    past = DynamicCache(config=model.config)
    stats.prompt_tokens, stats.cache_budget = len(ids), cache.budget
    start = cache.total()
    start_layers = {k: v + Counters() for k, v in cache.layers.items()}  # copies
    t0 = time.perf_counter()
    n = 0
    try:
        with torch.inference_mode():
            for i in range(0, len(ids), PREFILL_CHUNK):
                chunk = torch.tensor([ids[i : i + PREFILL_CHUNK]], device=device)
                out = model(input_ids=chunk, cache=past, use_cache=True, **extra)
            tok = sample(out.logits[0, -1], sampling, generator)
            t1 = time.perf_counter()
            stats.ttft_seconds = stats.prefill_seconds = t1 - t0
            after_prefill, busy0 = cache.total(), cache.reader.busy_seconds()
            stats.prefill = after_prefill - start
            if recorder is not None:
                recorder.decoding = True
            n = stats.generated_tokens = 1
            yield tok
            while n < max_new_tokens and tok not in eos:
                out = model(input_ids=torch.tensor([[tok]], device=device), cache=past, use_cache=True)
                tok = sample(out.logits[0, -1], sampling, generator)
                n = stats.generated_tokens = n + 1
                stats.decode_seconds = time.perf_counter() - t1
                stats.decode = cache.total() - after_prefill
                stats.decode_disk_busy_seconds = cache.reader.busy_seconds() - busy0
                yield tok
    finally:
        stats.layers = {k: v - start_layers.get(k, Counters()) for k, v in sorted(cache.layers.items())}
        stats.peak_rss = peak_rss_bytes()
