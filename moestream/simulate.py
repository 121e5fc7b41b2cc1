"""Replaying a routing trace through the runtime's own cache and policies, and through Belady's optimum.

The replay drives the real ExpertCache with a reader that reads nothing, in the same request
order the runtime uses (`request_groups`), so the simulated LRU counts equal a real run's.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import ExpertCache, request_groups, uses_of
from .costmodel import Machine, tokens_per_second
from .policy import Belady, Pinned, Policy, make_policy
from .store import LayerInfo
from .trace import Trace


class _Slot:
    """Stands in for a record buffer: has a size, holds nothing."""

    tensor = None
    region = False  # its own (imaginary) memory: freed when dropped

    def __init__(self, nbytes: int):
        self.nbytes = nbytes


class NullReader:
    def buffer(self, nbytes: int, populate: bool = False) -> _Slot:
        return _Slot(nbytes)

    def submit(self, info, expert, buf, guess: bool = False) -> Future:
        f = Future()
        f.set_result(0.0)
        return f


def _infos(trace: Trace) -> list[LayerInfo]:
    return [LayerInfo(int(l), f"layer{l}", "", int(e), int(s), [])
            for l, e, s in zip(trace.layers, trace.num_experts, trace.record_bytes)]


def requests(trace: Trace, cache_bytes: int):
    """Every (layer, expert) request in the runtime's order (the same loop as `simulate`)."""
    infos = _infos(trace)
    capacity = ExpertCache(NullReader(), cache_bytes).capacity
    for _, experts in trace.steps():
        for c, info in enumerate(infos):
            for group in request_groups(torch.from_numpy(experts[:, c]), info.experts, capacity(info)):
                for e in group:
                    yield info.layer, e


@dataclass
class SimResult:
    policy: str
    cache_bytes: int
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    decode_tokens: int = 0
    decode_requests: int = 0  # expert requests made while decoding (each layer's union, per token)
    decode_bytes: int = 0
    decode_misses: list[list[int]] = field(default_factory=list)  # per decode step, per layer

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    @property
    def decode_hit_rate(self) -> float:
        misses = sum(sum(m) for m in self.decode_misses)
        return 1 - misses / self.decode_requests if self.decode_requests else 0.0

    @property
    def decode_bytes_per_token(self) -> float:
        return self.decode_bytes / self.decode_tokens if self.decode_tokens else 0.0

    def predicted_tps(self, machine: Machine, record_bytes: list[int]) -> float:
        return tokens_per_second([machine.token_seconds(m, record_bytes) for m in self.decode_misses])

    def to_dict(self) -> dict:
        return {"policy": self.policy, "cache_bytes": self.cache_bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "bytes_read": self.bytes_read, "hit_rate": self.hit_rate,
                "decode_hit_rate": self.decode_hit_rate,
                "decode_tokens": self.decode_tokens, "decode_bytes_per_token": self.decode_bytes_per_token}


def simulate(trace: Trace, cache_bytes: int, policy: str | Policy = "lru", pin: list | None = None,
             scope: str = "global") -> SimResult:
    """Hits, misses and bytes for one cache size and policy ('lru', 'lfu', ... or 'belady'); `pin`:
    experts preloaded and never evicted, as `--pin` does (online policies only); `scope`: one budget for all
    layers, or "per-layer" (an equal share each, as --cache-scope; online policies only)."""
    if isinstance(policy, str):
        if policy == "belady":
            if scope != "global":
                raise ValueError("belady is the optimum of one global budget: scope global only")
            policy = Belady(requests(trace, cache_bytes))
        else:
            policy = make_policy(policy, scope)
    if cache_bytes < int(trace.record_bytes.max()):
        raise ValueError(f"cache of {cache_bytes} bytes holds no record of {int(trace.record_bytes.max())} bytes")
    infos = _infos(trace)
    if pin and not isinstance(policy, Belady):
        policy = Pinned(policy, pin)
    cache = ExpertCache(NullReader(), cache_bytes, policy)
    if pin and not isinstance(policy, Belady):
        cache.preload(infos, pin)
    if scope != "global":
        cache.split_budget(infos)
    result = SimResult(policy.name, cache_bytes)
    for decode, experts in trace.steps():
        misses, asked = [], 0
        for c, info in enumerate(infos):
            counters = cache.counters(info.layer)
            before = counters.misses
            chosen = uses_of(torch.from_numpy(experts[:, c]), info.experts)  # as the runtime counts them
            for group in request_groups(torch.from_numpy(experts[:, c]), info.experts, cache.capacity(info),
                                        cache.pinned.get(info.layer, ())):
                cache.get(info, group, [chosen[e] for e in group])
                asked += len(group)
            misses.append(counters.misses - before)
        if decode:
            result.decode_tokens += experts.shape[0]
            result.decode_requests += asked
            result.decode_misses.append(misses)
            result.decode_bytes += sum(m * info.record_bytes for m, info in zip(misses, infos))
    total = cache.total()
    result.hits, result.misses, result.evictions, result.bytes_read = (total.hits, total.misses, total.evictions,
                                                                      total.bytes_read)
    return result


def sweep(trace: Trace, sizes: list[int], policies: list[str]) -> list[SimResult]:
    return [simulate(trace, size, p) for p in policies for size in sizes]


def sweep_sizes(trace: Trace, points: int = 10) -> list[int]:
    """Cache sizes from a few records to every expert the trace could touch."""
    total = int((trace.num_experts.astype(np.int64) * trace.record_bytes).sum())
    smallest = int(trace.record_bytes.max()) * int(trace.top_k)
    return sorted({max(smallest, int(total * f)) for f in np.linspace(1 / points, 1, points)})


def plot(results: list[SimResult], path: str, machine: Machine | None, record_bytes: list[int]) -> None:
    """Hit rate (and predicted tok/s) against cache size, one line per policy."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'moestream[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if machine else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    for name in dict.fromkeys(r.policy for r in results):
        rs = [r for r in results if r.policy == name]
        x = [r.cache_bytes / 1e9 for r in rs]
        axes[0][0].plot(x, [100 * r.hit_rate for r in rs], marker="o", label=name)
        if machine:
            axes[0][1].plot(x, [r.predicted_tps(machine, record_bytes) for r in rs], marker="o", label=name)
    axes[0][0].set(xlabel="expert cache (GB)", ylabel="hit rate (%)", title="hit rate")
    if machine:
        axes[0][1].set(xlabel="expert cache (GB)", ylabel="decode tok/s", title="predicted decode speed")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
