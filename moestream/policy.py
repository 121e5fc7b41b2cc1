"""Cache replacement policies: which resident expert to evict next.

The runtime's ExpertCache and the simulator both drive these same classes, so a simulated
hit rate is the hit rate the runtime would get. A policy only orders keys; the cache owns
the bytes and the budget.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable

Key = tuple[int, int]  # (layer, expert)


class Policy:
    name = "base"

    def access(self, key: Key, hit: bool, uses: int = 1) -> None:
        """Called for every request of `key`, in request order, before any eviction it causes. `uses`: how many
        of the step's tokens chose it (a prefill chunk asks once for an expert many of its tokens chose)."""

    def insert(self, key: Key) -> None:
        """`key` became resident."""

    def remove(self, key: Key) -> None:
        """`key` was evicted."""

    def victim(self, pinned: set[Key], layer: int | None = None) -> Key | None:
        """The resident key to evict next, never one in `pinned`; None if all are pinned. `layer`: one of that
        layer's keys (only policies that keep layers apart, PerLayer, are asked for one)."""
        raise NotImplementedError


class LRU(Policy):
    """Evict the least recently used expert."""

    name = "lru"

    def __init__(self):
        self.order: OrderedDict[Key, None] = OrderedDict()

    def access(self, key: Key, hit: bool, uses: int = 1) -> None:
        if hit:
            self.order.move_to_end(key)

    def insert(self, key: Key) -> None:
        self.order[key] = None

    def remove(self, key: Key) -> None:
        del self.order[key]

    def victim(self, pinned: set[Key], layer: int | None = None) -> Key | None:
        return next((k for k in self.order if k not in pinned), None)


class _HeapPolicy(Policy):
    """Evict the resident key with the smallest priority; a lazy heap keeps that O(log n)."""

    def __init__(self):
        self.prio: dict[Key, tuple] = {}
        self.heap: list[tuple[tuple, Key]] = []
        self.resident: set[Key] = set()

    def _set(self, key: Key, prio: tuple) -> None:
        self.prio[key] = prio
        if key in self.resident:
            heapq.heappush(self.heap, (prio, key))
            if len(self.heap) > 4 * len(self.resident) + 64:  # each hit leaves a stale entry: drop them now and then
                self.heap = [(p, k) for p, k in self.heap if k in self.resident and self.prio.get(k, ()) == p]
                heapq.heapify(self.heap)

    def insert(self, key: Key) -> None:
        self.resident.add(key)
        heapq.heappush(self.heap, (self.prio.get(key, ()), key))

    def remove(self, key: Key) -> None:
        self.resident.discard(key)

    def victim(self, pinned: set[Key], layer: int | None = None) -> Key | None:
        held, found = [], None
        while self.heap:
            prio, key = self.heap[0]
            if key not in self.resident or self.prio.get(key, ()) != prio:
                heapq.heappop(self.heap)  # stale entry
            elif key in pinned:
                held.append(heapq.heappop(self.heap))
            else:
                found = key
                break
        for item in held:
            heapq.heappush(self.heap, item)
        return found


class LFU(_HeapPolicy):
    """Evict the expert used least often, with aging: a use counts 2**(t / half_life) at request t,
    which is exponential decay of old counts without rescaling; ties go to the least recent. A request counts
    once for each token that chose the expert: a prompt's popular experts come out of its prefill ahead (on
    bench_decode's model 6-7 % fewer bytes read a decoded token at 6 and 4 GiB's caches, simulated and measured,
    than counting each request once; benchmarks/RESULTS.md)."""

    name = "lfu"

    def __init__(self, half_life: int = 4096):
        super().__init__()
        self.half_life = half_life
        self.clock = 0
        self.score: dict[Key, float] = {}

    def access(self, key: Key, hit: bool, uses: int = 1) -> None:
        self.clock += 1
        if self.clock % (256 * self.half_life) == 0:  # keep weights far from float overflow
            self.score = {k: v / 2.0**256 for k, v in self.score.items()}
            self.prio = {k: (self.score[k], p[1]) for k, p in self.prio.items() if k in self.score}
            self.heap = [(self.prio[k], k) for k in self.resident]
            heapq.heapify(self.heap)
        w = 2.0 ** ((self.clock % (256 * self.half_life)) / self.half_life)
        self.score[key] = self.score.get(key, 0.0) + w * uses
        self._set(key, (self.score[key], self.clock))


class Belady(_HeapPolicy):
    """The offline optimum: evict the expert whose next request is furthest in the future.

    Needs the whole request sequence in advance (from a trace), so it exists only in the simulator.
    """

    name = "belady"

    def __init__(self, requests: Iterable[Key]):
        super().__init__()
        self.uses: dict[Key, list[int]] = {}
        for i, k in enumerate(requests):
            self.uses.setdefault(k, []).append(i)
        self.ptr: dict[Key, int] = {}

    def access(self, key: Key, hit: bool, uses: int = 1) -> None:
        p = self.ptr[key] = self.ptr.get(key, 0) + 1  # self.uses[key][p] is the next request after this one
        times = self.uses.get(key, [])
        nxt = times[p] if p < len(times) else float("inf")
        self._set(key, (-nxt,))


class Pinned(Policy):
    """Another policy, except that `keys` (the hottest experts of a profile) are never evicted."""

    def __init__(self, inner: Policy, keys: Iterable[Key]):
        self.inner = inner
        self.keys = set(keys)
        self.name = f"{inner.name}+pin"

    # A pinned key is never a victim: the inner policy never sees it (its uses would order nothing, and a heap
    # policy would step over every pinned key on each eviction).
    def access(self, key: Key, hit: bool, uses: int = 1) -> None:
        if key not in self.keys:
            self.inner.access(key, hit, uses)

    def insert(self, key: Key) -> None:
        if key not in self.keys:
            self.inner.insert(key)

    def remove(self, key: Key) -> None:
        if key not in self.keys:
            self.inner.remove(key)

    def victim(self, pinned: set[Key], layer: int | None = None) -> Key | None:
        return self.inner.victim(pinned, layer)


class PerLayer(Policy):
    """A policy of its own for each MoE layer (`make()` builds one): a layer's request evicts only that layer's
    experts, so each layer keeps its share of the budget (ExpertCache.split_budget)."""

    def __init__(self, make: Callable[[], Policy]):
        self.make = make
        self.layers: dict[int, Policy] = {}
        self.name = f"{make().name}/layer"

    def _of(self, layer: int) -> Policy:
        p = self.layers.get(layer)
        if p is None:
            p = self.layers[layer] = self.make()
        return p

    def access(self, key: Key, hit: bool, uses: int = 1) -> None:
        self._of(key[0]).access(key, hit, uses)

    def insert(self, key: Key) -> None:
        self._of(key[0]).insert(key)

    def remove(self, key: Key) -> None:
        self._of(key[0]).remove(key)

    def victim(self, pinned: set[Key], layer: int | None = None) -> Key | None:
        if layer is not None:
            return self._of(layer).victim(pinned)
        return next((k for p in self.layers.values() if (k := p.victim(pinned)) is not None), None)


POLICIES = {"lru": LRU, "lfu": LFU}  # the online policies the runtime offers (--cache-policy)
SCOPES = ("global", "per-layer")  # --cache-scope: one budget for all layers, or an equal share each


def make_policy(name: str, scope: str = "global") -> Policy:
    if name not in POLICIES:
        raise ValueError(f"--cache-policy {name!r}: choose one of {', '.join(POLICIES)}")
    if scope not in SCOPES:
        raise ValueError(f"--cache-scope {scope!r}: choose one of {', '.join(SCOPES)}")
    return POLICIES[name]() if scope == "global" else PerLayer(POLICIES[name])
