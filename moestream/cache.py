"""The expert cache: stored records (compact form) in RAM under a hard byte budget.

Which entry to evict is the policy's choice (policy.py); evicted buffers are reused for the
next miss of the same size, so steady-state decode allocates nothing. Counters are kept per
layer and summed on demand. The simulator runs this same class with a reader that reads nothing.
"""

from __future__ import annotations

import time
from collections.abc import Container, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, fields

import torch

from .policy import LRU, Key, Policy
from .reader import AlignedBuffer, RecordReader, huge_region
from .sizes import format_size
from .store import LayerInfo


ORGANIC_WEIGHT = 0.25  # a fetch's weight in a layer's recent organic hit rate (ExpertCache.organic)


def request_groups(top_k_index: torch.Tensor | list[int], num_experts: int, capacity: int,
                   held: Container[int] = ()) -> list[list[int]]:
    """The experts one layer call fetches: the union of the tokens' choices (a tensor, or one token's as a list),
    ascending, in groups that each bring in at most `capacity` experts (what fits the cache at once) besides those
    `held` (pinned in the cache: already there, needing no room; a cache all pinned once ran every expert in a
    group of its own). Shared by the runtime and the simulator."""
    chosen = top_k_index if isinstance(top_k_index, list) else torch.unique(top_k_index).tolist()
    wanted = sorted({e for e in chosen if 0 <= e < num_experts})
    step = max(1, capacity)
    groups: list[list[int]] = []
    room = 0
    for e in wanted:
        if not groups or (e not in held and room == 0):
            groups.append([])
            room = step
        if e not in held:
            room -= 1
        groups[-1].append(e)
    return groups


def uses_of(top_k_index: torch.Tensor, num_experts: int) -> list[int]:
    """How many of a step's tokens chose each expert (padding, -1, left out): the counts a prefill chunk's single
    request for each expert passes to the policy (ExpertCache.fetch's `uses`). Shared by the runtime and the
    simulator."""
    chosen = top_k_index.flatten()
    return torch.bincount(chosen[chosen >= 0], minlength=num_experts).tolist()


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0  # summed over reader threads
    wait_seconds: float = 0.0  # time the compute thread spent blocked on reads
    prefetched: int = 0  # reads started by the prefetcher (also counted in bytes_read)
    prefetch_cancelled: int = 0  # guesses dropped before their read started (a request came first)
    prefetch_used: int = 0  # of those, requested by a layer before being evicted

    def __add__(self, other: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class ExpertCache:
    """(layer, expert) -> record buffer, never holding more than `budget` bytes."""

    def __init__(self, reader: RecordReader, budget: int, policy: Policy | None = None):
        self.reader = reader
        self.budget = int(budget)
        self.policy = policy or LRU()
        self.used = 0
        self.peak_used = 0
        self.entries: dict[Key, AlignedBuffer] = {}
        self.layers: dict[int, Counters] = {}
        self.pinned_bytes = 0  # held by preloaded (pinned) experts, never evicted
        self.pinned: dict[int, set[int]] = {}  # those experts, by layer
        self.inflight: dict[Key, Future] = {}  # prefetched reads not yet requested (running ones are pinned)
        self.unused_prefetch: set[Key] = set()
        self.ahead: set[Key] = set()  # guesses whose layer has not asked since: no other guess evicts them (prefetch)
        self.spare: list[AlignedBuffer] = []  # reserved record buffers not yet holding a record
        self.organic: dict[int, float] = {}  # per layer: recent share of requests the cache held unguessed (EMA)
        self.layer_budget: dict[int, int] | None = None  # --cache-scope per-layer: each layer's bytes (split_budget)
        self.layer_used: dict[int, int] = {}

    def reserve(self, infos: list[LayerInfo]) -> int:
        """Allocate the budget's record buffers now (slices of one huge_region), every page touched, when all
        layers' records have one size (else none); returns how many. A process's first touch of memory can cost
        far more than reuse: here, just after the page cache was dropped, fresh pages came at 0.2-1.4 GB/s and
        reads into fresh buffers slowed the compute beside them 3-5x; a 4 GiB run whose cache grew during decode
        ran at 2.7 tok/s against 3.9 at 2 GiB with recycled buffers (benchmarks/RESULTS.md). Paid once, at load."""
        sizes = {i.record_bytes for i in infos}
        if len(sizes) != 1:
            return 0
        size = sizes.pop()
        have = self.used + sum(b.nbytes for b in self.spare)
        n = (self.budget - have) // size
        if n <= 0:
            return len(self.spare)
        region = huge_region(n * size)  # one mapping on huge pages: the experts' kernels read them faster
        region.zero_()  # every page touched now
        self.spare += [AlignedBuffer(size, region=region[i * size:(i + 1) * size]) for i in range(n)]
        return len(self.spare)

    def split_budget(self, infos: list[LayerInfo]) -> None:
        """--cache-scope per-layer: each layer may hold its pinned experts and an equal share, in whole records,
        of the budget left after all pinned ones; a layer's miss then evicts only that layer's experts. Call
        after preload; the policy must keep layers apart (make_policy(name, "per-layer"))."""
        from .policy import PerLayer, Pinned

        inner = self.policy.inner if isinstance(self.policy, Pinned) else self.policy
        if not isinstance(inner, PerLayer):
            raise ValueError(f"a per-layer budget needs a per-layer policy, not {self.policy.name}")
        share = (self.budget - self.pinned_bytes) // max(1, len(infos))
        small = [i for i in infos if share < i.record_bytes]
        if small:
            raise MemoryError(f"--cache-scope per-layer: {format_size(self.budget - self.pinned_bytes)} of "
                              f"unpinned expert cache over {len(infos)} layers leaves layer {small[0].layer} less "
                              f"than one record ({format_size(small[0].record_bytes)}); give a larger "
                              "--cache/--memory or use --cache-scope global")
        self.layer_budget = {i.layer: (len(self.pinned.get(i.layer, ())) + share // i.record_bytes) * i.record_bytes
                             for i in infos}

    def capacity(self, info: LayerInfo) -> int:
        """How many records of this layer one request may bring in at once (pinned bytes excluded)."""
        if self.layer_budget is not None and info.layer in self.layer_budget:
            return max(1, self.layer_budget[info.layer] // info.record_bytes - len(self.pinned.get(info.layer, ())))
        return max(1, (self.budget - self.pinned_bytes) // info.record_bytes)

    def counters(self, layer: int) -> Counters:
        c = self.layers.get(layer)
        if c is None:
            c = self.layers[layer] = Counters()
        return c

    def total(self) -> Counters:
        return sum(self.layers.values(), Counters())

    def reset_counters(self) -> None:
        self.layers.clear()

    def _buffer_for(self, nbytes: int, pinned: set[tuple[int, int]], layer: int, block: bool = True) -> AlignedBuffer:
        """Make room for `nbytes` of `layer` by evicting the policy's victims (within the layer where its share
        is full: split_budget); reuse an evicted buffer if it fits. `block`: where only reads in flight stand in
        the way, wait for one to land (a request); else MemoryError (a guess never waits)."""
        reuse = None
        asked = pinned
        running = {k for k, f in self.inflight.items() if not f.done()}
        pinned = asked | running  # a buffer being read into cannot be handed to another read
        quota = self.layer_budget.get(layer) if self.layer_budget is not None else None
        while True:
            full = quota is not None and self.layer_used.get(layer, 0) + nbytes > quota
            if not full and self.used + nbytes <= self.budget:
                break
            key = self.policy.victim(pinned, layer if full else None)
            if key is None and running and block:  # only guesses being read are left: the first to land can go
                wait([self.inflight[k] for k in running], return_when=FIRST_COMPLETED)
                running = {k for k, f in self.inflight.items() if not f.done()}
                pinned = asked | running
                continue
            if key is None:
                raise MemoryError(
                    f"expert cache budget {format_size(self.budget)} cannot hold the {len(pinned)} records "
                    f"one step needs at once; give a larger --cache/--memory"
                )
            buf = self.entries.pop(key)
            self.policy.remove(key)
            self.unused_prefetch.discard(key)
            self.ahead.discard(key)
            self.inflight.pop(key, None)
            self.used -= buf.nbytes
            self.layer_used[key[0]] -= buf.nbytes
            self.counters(key[0]).evictions += 1
            if reuse is None and buf.nbytes == nbytes:
                reuse = buf
            else:
                self._release(buf)
        self.used += nbytes
        self.layer_used[layer] = self.layer_used.get(layer, 0) + nbytes
        self.peak_used = max(self.peak_used, self.used)
        if reuse is None and self.spare and self.spare[-1].nbytes == nbytes:
            reuse = self.spare.pop()
        return reuse if reuse is not None else self.reader.buffer(nbytes)

    def fetch(self, info: LayerInfo, experts: list[int], uses: list[int] | None = None) -> Fetch:
        """Start fetching `experts` of one layer: hits are ready now, misses are read in parallel and
        can be consumed as each lands (`Fetch.arrivals`), so compute overlaps the reads still in flight.
        `uses`: how many tokens chose each (the policy's access counts; default one each)."""
        if len(experts) * info.record_bytes > self.budget:
            raise MemoryError(
                f"{len(experts)} records of {format_size(info.record_bytes)} exceed the expert cache budget "
                f"{format_size(self.budget)}; request at most {self.capacity(info)} at a time"
            )
        c = self.counters(info.layer)
        pinned = {(info.layer, e) for e in experts}
        if self.ahead:  # this layer's guesses not asked for now were wrong: any miss may evict them
            self.ahead = {k for k in self.ahead if k[0] != info.layer}
        if self.inflight:
            self._settle()
        for key in [k for k in self.inflight if k[0] == info.layer and k not in pinned]:
            if self.inflight[key].cancel():  # a wrong guess whose read has not started: it would delay ours
                self._drop(key, self.entries[key])
                c.prefetched -= 1
                c.prefetch_cancelled += 1
                c.bytes_read -= info.record_bytes
        f = Fetch(self, info, c)
        held = 0  # hits the cache had without a guess
        for i, e in enumerate(experts):
            key = (info.layer, e)
            buf = self.entries.get(key)
            self.policy.access(key, buf is not None, uses[i] if uses else 1)
            if buf is not None:
                c.hits += 1
                if key in self.unused_prefetch:
                    self.unused_prefetch.discard(key)
                    c.prefetch_used += 1
                else:
                    held += 1
                inflight = self.inflight.pop(key, None)
                if inflight is not None and inflight.cancel():  # a guess still queued: read now, beside our misses
                    f.pending[self.reader.submit(info, e, buf)] = (e, buf, False)
                elif inflight is not None:
                    f.pending[inflight] = (e, buf, False)  # prefetched: wait for (or check) its read
                else:
                    f.ready[e] = buf.tensor
            else:
                c.misses += 1
                buf = self._buffer_for(info.record_bytes, pinned, info.layer)
                self.entries[key] = buf  # reserved now so later misses in this call cannot evict it
                self.policy.insert(key)
                f.pending[self.reader.submit(info, e, buf)] = (e, buf, True)
        share = held / max(1, len(experts))
        recent = self.organic.get(info.layer, share)
        self.organic[info.layer] = recent + ORGANIC_WEIGHT * (share - recent)
        return f

    def prefetch(self, info: LayerInfo, experts: list[int], keep: list[tuple[int, int]]) -> None:
        """Start reading guessed experts of a coming layer; never evicts `keep` or other reads in flight.
        Prefetch only loads records: results cannot change, only where time goes. A guess never evicts another
        whose layer has not asked since (`ahead`): under LFU a record just read is among the least used, so a
        guess for a coming layer took the room of the guesses its own layer was about to ask for (in-process at
        6 GiB, bench_decode's model with early next-layer guesses (guess_own): 234 MB read a token where a guess
        could evict another, 181 where it could not, on the same tokens)."""
        layer = info.layer
        if all((layer, e) in self.entries for e in experts):  # the common case: nothing to read (~10 us, not ~80)
            return
        c = self.counters(layer)
        self._settle()
        if self.layer_budget is not None:  # a layer's share: other layers' records and reads take none of it
            room = self.capacity(info) - sum(not f.done() for k, f in self.inflight.items() if k[0] == layer)
        else:
            room = self.capacity(info) - len(keep) - sum(not f.done() for f in self.inflight.values())
        pinned = {*keep, *self.ahead, *((layer, x) for x in experts)}
        for e in experts[: max(0, room)]:
            key = (layer, e)
            if key in self.entries:
                continue
            try:
                buf = self._buffer_for(info.record_bytes, pinned, layer, block=False)
            except MemoryError:
                return  # nothing evictable now: skip the guess
            self.entries[key] = buf
            self.policy.insert(key)
            c.prefetched += 1
            c.bytes_read += info.record_bytes
            self.unused_prefetch.add(key)
            self.ahead.add(key)
            self.inflight[key] = self.reader.submit(info, e, buf, guess=True)

    def get(self, info: LayerInfo, experts: list[int], uses: list[int] | None = None) -> dict[int, torch.Tensor]:
        """Records (uint8 tensors) for `experts` of one layer, all of them, once every read has landed."""
        f = self.fetch(info, experts, uses)
        out = dict(f.ready)
        out.update(f.arrivals())
        return out

    def preload(self, infos: list[LayerInfo], keys: list[Key]) -> None:
        """Read pinned `keys` into the cache now, layer by layer, in groups that fit; from then on the
        room they take is left out of `capacity`. The policy must never evict them (policy.Pinned)."""
        by_layer = {i.layer: i for i in infos}
        for layer in sorted({k[0] for k in keys}):
            info = by_layer[layer]
            experts = sorted(e for lay, e in keys if lay == layer)
            step = self.capacity(info)
            for i in range(0, len(experts), step):
                self.get(info, experts[i : i + step])
        self.pinned_bytes = sum(by_layer[layer].record_bytes for layer, _ in keys)
        for layer, e in keys:
            self.pinned.setdefault(layer, set()).add(e)

    def _settle(self) -> None:
        """Forget the guesses whose reads have ended: their records stay (still unused_prefetch until asked for);
        a failed one is dropped, so the request that wants it reads it again and meets the error itself. Without
        this every wrong guess stayed in `inflight`, which fetch and _buffer_for scan on every call."""
        for key in [k for k, f in self.inflight.items() if f.done()]:
            fut = self.inflight.pop(key)
            if fut.cancelled() or fut.exception() is not None:
                self._drop(key, self.entries[key])

    def _drop(self, key: Key, buf) -> None:
        if self.entries.pop(key, None) is not None:
            self.policy.remove(key)
            self.unused_prefetch.discard(key)
            self.ahead.discard(key)
            self.inflight.pop(key, None)
            self.used -= buf.nbytes
            self.layer_used[key[0]] -= buf.nbytes
            self._release(buf)

    def _release(self, buf: AlignedBuffer) -> None:
        """A buffer that no longer holds a record: a slice of reserve()'s region goes back to `spare` (its memory
        cannot be given back alone, and must stay counted); a buffer with its own mapping is freed when dropped."""
        if buf.region:
            self.spare.append(buf)

    def clear(self) -> None:
        for fut in self.inflight.values():
            fut.cancel()
        wait(list(self.inflight.values()))
        for key, buf in self.entries.items():
            self.policy.remove(key)
            self._release(buf)
        self.entries.clear()
        self.inflight.clear()
        self.unused_prefetch.clear()
        self.ahead.clear()
        self.used = 0
        self.layer_used.clear()


class Fetch:
    """One layer's request in flight: `ready` records now, the rest as their reads complete."""

    def __init__(self, cache: ExpertCache, info: LayerInfo, counters: Counters):
        self.cache, self.info, self.counters = cache, info, counters
        self.ready: dict[int, torch.Tensor] = {}
        self.pending: dict[Future, tuple[int, AlignedBuffer, bool]] = {}  # (expert, buffer, a miss of ours?)

    def arrivals(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(expert, record) for each miss as its read lands; time blocked here counts as I/O wait.
        A failed read removes every record of this fetch still unread, so none is left half-read."""
        c = self.counters
        try:
            while self.pending:
                t0 = time.perf_counter()
                done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
                c.wait_seconds += time.perf_counter() - t0
                for fut in done:
                    e, buf, ours = self.pending.pop(fut)
                    try:
                        seconds = fut.result()
                    except BaseException:
                        self.cache._drop((self.info.layer, e), buf)
                        raise
                    if ours:  # a prefetched read was counted when the prefetcher started it
                        c.read_seconds += seconds
                        c.bytes_read += self.info.record_bytes
                    yield e, buf.tensor
        finally:
            for fut, (e, buf, _) in self.pending.items():
                fut.cancel()
                self.cache._drop((self.info.layer, e), buf)
            self.pending.clear()
