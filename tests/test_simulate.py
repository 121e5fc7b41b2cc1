"""Traces, the cache simulator and the cost model."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import moestream
from conftest import expert_bytes
from moestream.costmodel import Machine, tokens_per_second
from moestream.simulate import simulate, sweep_sizes
from moestream.trace import Trace, TraceError

PROMPTS = [[5, 17, 42, 99, 7, 250, 3, 61], [11, 12, 13], [300, 2, 88, 41, 19]]


def make_trace(steps: list[list[list[int]]], num_experts: int = 4, record: int = 4096, decode=None) -> Trace:
    """steps[s][token] = the experts each of 1 layer's tokens chose (top-k lists)."""
    tokens = [len(s) for s in steps]
    k = max(len(t) for s in steps for t in s)
    experts = np.full((sum(tokens), 1, k), -1, dtype=np.int32)
    row = 0
    for s in steps:
        for t in s:
            experts[row, 0, : len(t)] = t
            row += 1
    n = len(steps)
    return Trace(np.array([0]), np.array([num_experts]), np.array([record]), np.array(tokens),
                 np.zeros(n, dtype=np.int32), np.array(decode if decode is not None else [True] * n),
                 experts, np.zeros(experts.shape, dtype=np.float16), {})


SEQ = [[[0]], [[1]], [[0]], [[2]], [[1]], [[0]]]  # A B A C B A, one token per step, top-1


@pytest.mark.parametrize("policy,hits,misses,evictions,per_step", [
    ("lru", 1, 5, 3, [1, 1, 0, 1, 1, 1]),  # A m, B m, A h, C m (evict B), B m (evict A), A m (evict C)
    ("lfu", 2, 4, 2, [1, 1, 0, 1, 1, 0]),  # C evicts B (count 1 < A's 2), B evicts C, A hits
    ("belady", 2, 4, 2, [1, 1, 0, 1, 0, 1]),  # C evicts A (next use 5, B's is 4), B hits, A misses
])
def test_hand_checked_trace(policy, hits, misses, evictions, per_step):
    r = simulate(make_trace(SEQ), 2 * 4096, policy)
    assert (r.hits, r.misses, r.evictions) == (hits, misses, evictions)
    assert r.bytes_read == misses * 4096
    assert r.decode_tokens == 6 and r.decode_misses == [[m] for m in per_step]


def test_prefill_union_is_read_once():
    # One prefill step of 3 tokens choosing {0,1}, {1,2}, {0,2}: 3 distinct experts, 3 misses, not 6.
    r = simulate(make_trace([[[0, 1], [1, 2], [0, 2]]], decode=[False]), 4 * 4096, "lru")
    assert (r.hits, r.misses) == (0, 3)
    assert r.decode_tokens == 0


def test_lfu_counts_each_token_that_chose_an_expert():
    """A prefill step asks once for the union of its tokens' experts, but LFU counts expert 0 three times (three
    tokens chose it) and expert 1 once: the decode's new expert 2 evicts 1, and 0 then hits. Counting each request
    once, 0 and 1 would tie and 0, the least recent, would go."""
    trace = make_trace([[[0, -1], [0, -1], [0, 1]], [[2]], [[0]]], decode=[False, True, True])
    r = simulate(trace, 2 * 4096, "lfu")
    assert (r.hits, r.misses, r.evictions) == (1, 3, 1)
    assert r.decode_misses == [[1], [0]]


def test_belady_is_at_least_every_policy_on_random_traces():
    rng = random.Random(0)
    for trial in range(30):
        e, k = rng.choice([(8, 2), (16, 4), (32, 4)])
        hot = rng.sample(range(e), k=max(1, e // 4))
        steps = []
        for _ in range(rng.randint(20, 80)):
            n = rng.choice([1, 1, 1, 3])
            steps.append([rng.sample(hot if rng.random() < 0.6 else range(e), k) for _ in range(n)])
        t = make_trace(steps, num_experts=e)
        for cap in (k, k + 1, e // 2, e - 1):
            opt = simulate(t, cap * 4096, "belady").hits
            for p in ("lru", "lfu"):
                assert opt >= simulate(t, cap * 4096, p).hits, (trial, cap, p)


@pytest.mark.parametrize("policy,scope", [("lru", "global"), ("lfu", "global"), ("lfu", "per-layer")])
def test_simulator_equals_runtime_counters(qwen3_store, tmp_path, policy, scope):
    budget = expert_bytes(qwen3_store) // 4
    with moestream.load(qwen3_store, cache=budget, device="cpu", trace=True, cache_policy=policy, cache_scope=scope,
                        prefetch="none") as m:  # the simulator replays requests only, no guesses
        for p in PROMPTS:
            list(m.stream_ids(p, max_new_tokens=12, stop_at_eos=False))
        path = m.save_trace(tmp_path / "t.npz")
        runtime = {layer: c for layer, c in m.cache.layers.items()}
        if scope == "per-layer":  # every layer within its share, and the shares within the budget
            assert all(m.cache.layer_used[layer] <= share for layer, share in m.cache.layer_budget.items())
            assert sum(m.cache.layer_budget.values()) <= budget
    t = Trace.load(path)
    r = simulate(t, budget, policy, scope=scope)
    total = sum(runtime.values(), type(next(iter(runtime.values())))())
    assert (r.hits, r.misses, r.evictions, r.bytes_read) == (total.hits, total.misses, total.evictions,
                                                             total.bytes_read)
    assert total.evictions > 0
    # Belady on the same trace does at least as well.
    assert simulate(t, budget, "belady").hits >= r.hits


def test_trace_file_contents(qwen3_store, tmp_path):
    with moestream.load(qwen3_store, cache="1MB", device="cpu", trace=True) as m:
        for p in PROMPTS:
            list(m.stream_ids(p, max_new_tokens=5, stop_at_eos=False))
        path = m.save_trace(tmp_path / "t.npz")
    t = Trace.load(path)
    assert list(t.layers) == [0, 2] and t.top_k == 2
    assert int(t.step_tokens.sum()) == sum(len(p) + 4 for p in PROMPTS)  # prompt + decoded (the 5th isn't fed)
    assert t.decode_tokens == 3 * 4
    assert sorted(set(t.step_sequence.tolist())) == [0, 1, 2]
    assert t.experts.min() >= 0 and t.experts.max() < 8
    w = t.weights.astype(np.float32)
    assert (w > 0).all() and (w.sum(-1) <= 1 + 1e-3).all()  # softmax probabilities of the chosen experts
    assert len(t.meta["runs"]) == 3 and t.meta["model_type"] == "qwen3_moe"


def test_bad_trace_file(tmp_path):
    with pytest.raises(TraceError, match="no such trace"):
        Trace.load(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="not a moestream trace"):
        Trace.load(tmp_path / "bad.npz")
    (tmp_path / "empty.npz").write_bytes(b"")  # numpy raises EOFError for it
    with pytest.raises(TraceError, match="not a moestream trace"):
        Trace.load(tmp_path / "empty.npz")


def test_cost_model_arithmetic():
    m = Machine(bandwidth=1e9, latency=1e-3, queue_depth=2, compute=0.01)
    # layer 1: 3 misses -> 2 rounds + 3 MB at 1 GB/s; layer 2: 1 miss -> 1 round + 1 MB
    assert m.io_seconds([3, 1], [10**6, 10**6]) == pytest.approx(2e-3 + 3e-3 + 1e-3 + 1e-3)
    assert m.token_seconds([3, 1], [10**6, 10**6]) == pytest.approx(0.017)
    assert m.io_seconds([0, 0], [10**6, 10**6]) == 0
    assert tokens_per_second([0.1, 0.3]) == pytest.approx(5.0)
    r = simulate(make_trace(SEQ), 2 * 4096, "lru")
    expected = tokens_per_second([m.token_seconds(x, [4096]) for x in r.decode_misses])
    assert r.predicted_tps(m, [4096]) == pytest.approx(expected)


def test_sweep_sizes_span_to_all_experts():
    t = make_trace(SEQ, num_experts=4)
    sizes = sweep_sizes(t)
    assert sizes[-1] == 4 * 4096 and sizes[0] >= 4096 and sizes == sorted(sizes)


def test_cli_trace_simulate_plot(qwen3_store, tmp_path):
    from test_cli import cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):\n\nimport os\nclass A:\n")
    r = cli("trace", qwen3_store, "--prompts", prompts, "--out", tmp_path / "t.npz", "--cache", "60KB", "-n", 6,
            "--raw")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "3 prompt(s)" in r.stdout
    r = cli("simulate", tmp_path / "t.npz", "--sweep", "--plot", tmp_path / "s.png", "--ssd", "1GB/s")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "belady" in r.stdout and "lru" in r.stdout
    r = cli("simulate", tmp_path / "t.npz", "--cache", "60KB", "--json")
    rows = json.loads(r.stdout)
    assert {x["policy"] for x in rows} == {"lru", "lfu", "belady"}
    assert all(x["predicted_tps"] is not None for x in rows)  # SSD speed as observed in the traced run
    r = cli("simulate", tmp_path / "missing.npz", "--cache", "1MB")
    assert r.returncode == 2 and "no such trace" in r.stderr
    r = cli("profile", "--from-trace", tmp_path / "t.npz", "--out", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "p.json").read_text())["format"] == "moestream-profile"
    r = cli("profile", qwen3_store, "--prompts", prompts, "--out", tmp_path / "p2.json", "--cache", "60KB", "-n", 4)
    assert r.returncode == 0, r.stderr
    r = cli("run", qwen3_store, "-p", "x", "-n", 4, "--cache", "100KB", "--pin", tmp_path / "p2.json")
    assert r.returncode == 0, r.stderr
    r = cli("simulate", tmp_path / "t.npz", "--cache", "100KB", "--policies", "lru", "--pin", tmp_path / "p.json")
    assert r.returncode == 0 and "lru+pin" in r.stdout
    r = cli("simulate", tmp_path / "t.npz", "--cache", "100KB", "--scopes", "global,per-layer")
    assert r.returncode == 0, r.stderr
    assert "lfu/layer" in r.stdout and "lru/layer" in r.stdout and "belady" in r.stdout
    r = cli("run", qwen3_store, "-p", "x", "-n", 4, "--cache", "100KB", "--cache-scope", "per-layer")
    assert r.returncode == 0, r.stderr


def test_expected_io_averages_rounds_over_the_binomial():
    m = Machine(bandwidth=1e9, latency=1e-3, queue_depth=2)
    # k = 2, miss rate 0.5: P(0) = .25, P(1) = .5, P(2) = .25 -> 0.75 rounds; 1 expected miss of 1 MB.
    assert m.expected_io_seconds(2, 0.5, 10**6, 3) == pytest.approx(3 * (0.75e-3 + 1e-3))
    assert m.expected_io_seconds(4, 0.0, 10**6, 3) == 0


def test_decode_hit_rate_leaves_out_prefill():
    # Prefill touches 0..3 (4 compulsory misses); decode then asks for 0 and 1 only: all hits.
    t = make_trace([[[0], [1], [2], [3]], [[0]], [[1]]], decode=[False, True, True])
    r = simulate(t, 4 * 4096, "lru")
    assert r.hit_rate == pytest.approx(2 / 6) and r.decode_hit_rate == 1.0 and r.decode_requests == 2


def test_pinned_expert_is_never_evicted():
    # Pin A (expert 0): preloaded (1 miss), then A h, B m, A h, C m (evicts B, not A), B m (evicts C), A h.
    r = simulate(make_trace(SEQ), 2 * 4096, "lru", pin=[(0, 0)])
    assert (r.hits, r.misses, r.evictions) == (3, 4, 2)
    assert r.policy == "lru+pin"


def test_pinning_in_runtime_equals_simulator_and_keeps_tokens(qwen3_store, tmp_path):
    from moestream.profile import ProfileError, hottest, profile_from_trace

    budget = expert_bytes(qwen3_store) // 3
    with moestream.load(qwen3_store, cache=budget, device="cpu", trace=True, cache_policy="lru", prefetch="none") as m:
        plain = [list(m.stream_ids(p, max_new_tokens=10, stop_at_eos=False)) for p in PROMPTS]
        trace = Trace.load(m.save_trace(tmp_path / "t.npz"))
    profile = profile_from_trace(trace)
    with moestream.load(qwen3_store, cache=budget, device="cpu", pin=profile, pin_share=0.5, cache_policy="lru",
                        prefetch="none") as m:
        keys = hottest(profile, budget // 2, {int(l): int(b) for l, b in zip(trace.layers, trace.record_bytes)})
        assert keys and all(k in m.cache.entries for k in keys)
        pinned = [list(m.stream_ids(p, max_new_tokens=10, stop_at_eos=False)) for p in PROMPTS]
        assert all(k in m.cache.entries for k in keys)  # still resident after every prompt
        assert m.cache.used <= budget
        runtime = m.cache.total()
    assert pinned == plain  # a policy cannot change results
    sim = simulate(trace, budget, "lru", pin=keys)
    assert (sim.hits, sim.misses, sim.evictions) == (runtime.hits, runtime.misses, runtime.evictions)
    with pytest.raises(ProfileError, match="MoE layers"):
        hottest(profile, budget, {0: 4096})


def test_request_groups_leave_pinned_experts_out_of_the_room():
    import torch

    from moestream.cache import request_groups

    idx = torch.tensor([[5, 1, 3], [7, 1, 2]])
    assert request_groups(idx, 8, 2) == [[1, 2], [3, 5], [7]]
    assert request_groups(idx, 8, 2, held={1, 3, 5}) == [[1, 2, 3, 5, 7]]
    assert request_groups(idx, 8, 1, held={2}) == [[1, 2], [3], [5], [7]]


def test_a_cache_all_pinned_fetches_each_layer_once(qwen3_store, monkeypatch):
    """Every expert pinned (bench_decode's resident run): one request a layer, not one per expert (which
    the pinned bytes leaving `capacity` at 1 once caused)."""
    import torch

    from moestream.cache import ExpertCache
    from moestream.store import Store

    store = Store.open(qwen3_store)
    profile = {"format": "moestream-profile", "version": 1, "tokens": 1,
               "counts": {str(i.layer): [1] * i.experts for i in store.layers},
               "record_bytes": {str(i.layer): i.record_bytes for i in store.layers}}
    with moestream.load(qwen3_store, cache=expert_bytes(qwen3_store), device="cpu", pin=profile, pin_share=1.0) as m:
        assert m.cache.capacity(store.layers[0]) == 1 and len(m.cache.entries) == sum(i.experts for i in store.layers)
        calls = []
        real = ExpertCache.fetch
        monkeypatch.setattr(ExpertCache, "fetch", lambda self, info, experts, uses=None: calls.append(len(experts))
                            or real(self, info, experts, uses))
        with torch.no_grad():
            m.model(torch.tensor([[5]]))  # one token: each MoE layer asks for its top 2 once
        assert calls == [2] * len(store.layers)


def test_records_of_two_sizes_evict_each_other():
    """Layer 0's records 4096 bytes, layer 1's 8192, a cache of 12288: layer 0 fills 8192 with two experts, and
    layer 1's record then evicts one of them, a buffer it cannot reuse (dropped, not kept as a spare)."""
    experts = np.array([[[0, 1], [0, -1]]], dtype=np.int32)  # one token: layer 0 asks 0 and 1, layer 1 asks 0
    trace = Trace(np.array([0, 1]), np.array([4, 4]), np.array([4096, 8192]), np.ones(1, dtype=np.int64),
                  np.zeros(1, dtype=np.int32), np.array([True]), experts, np.zeros(experts.shape, np.float16), {})
    r = simulate(trace, 12288, "lru")
    assert (r.hits, r.misses, r.evictions) == (0, 3, 1)


def two_layer_trace(tokens: list[tuple[int, int]], num_experts: int = 4, record: int = 4096) -> Trace:
    """One decode step per token; tokens[i] = (layer 0's expert, layer 1's expert), top-1."""
    experts = np.array([[[a], [b]] for a, b in tokens], dtype=np.int32)
    n = len(tokens)
    return Trace(np.array([0, 1]), np.array([num_experts] * 2), np.array([record] * 2), np.ones(n, dtype=np.int64),
                 np.zeros(n, dtype=np.int32), np.ones(n, dtype=bool), experts, np.zeros(experts.shape, np.float16), {})


def test_per_layer_budget_keeps_each_layer_to_its_share():
    """Layer 0 cycles over 3 experts, layer 1 always asks for one. A global cache of 4 records holds all 4 after the
    first round; split 2 and 2, layer 0's three cannot share two slots under LRU and miss on every token, while
    layer 1 keeps its expert."""
    t = two_layer_trace([(i % 3, 0) for i in range(12)])
    g = simulate(t, 4 * 4096, "lru")
    p = simulate(t, 4 * 4096, "lru", scope="per-layer")
    assert (g.misses, g.policy) == (4, "lru")
    assert (p.misses, p.policy) == (12 + 1, "lru/layer")
    assert [m[1] for m in p.decode_misses] == [1] + [0] * 11


def test_per_layer_budget_errors():
    from moestream.policy import make_policy

    t = two_layer_trace([(0, 0), (1, 1)])
    with pytest.raises(MemoryError, match="--cache-scope per-layer"):
        simulate(t, 4096, "lfu", scope="per-layer")  # one record over two layers
    with pytest.raises(ValueError, match="--cache-scope"):
        make_policy("lfu", "everywhere")
    with pytest.raises(ValueError, match="belady"):
        simulate(t, 4 * 4096, "belady", scope="per-layer")


def test_a_full_layer_share_waits_for_guesses_being_read():
    """Per-layer share of 2 records, both taken by guesses still being read: a request for 2 other experts waits
    for a guess to land and evicts it, instead of failing for want of a victim."""
    import threading
    import time
    from concurrent.futures import Future

    from moestream.cache import ExpertCache
    from moestream.policy import make_policy
    from moestream.simulate import NullReader, _infos

    class SlowGuesses(NullReader):
        def submit(self, info, expert, buf, guess=False):
            if not guess:
                return super().submit(info, expert, buf)
            f = Future()
            f.set_running_or_notify_cancel()  # started: a request cannot cancel it
            threading.Timer(0.2, f.set_result, (0.2,)).start()
            return f

    infos = _infos(two_layer_trace([(0, 0)]))
    cache = ExpertCache(SlowGuesses(), 4 * 4096, make_policy("lru", "per-layer"))
    cache.split_budget(infos)
    cache.prefetch(infos[1], [0, 1], keep=[])
    assert cache.layer_used[1] == 2 * 4096 and all(not f.done() for f in cache.inflight.values())
    t0 = time.perf_counter()
    with pytest.raises(MemoryError):  # a guess's room never waits for reads
        cache._buffer_for(4096, set(), 1, block=False)
    assert time.perf_counter() - t0 < 0.1
    got = cache.get(infos[1], [2, 3])
    assert sorted(got) == [2, 3] and time.perf_counter() - t0 >= 0.15
    assert cache.layer_used[1] == 2 * 4096 and cache.total().evictions == 2


@pytest.mark.parametrize("name", ["lfu", "belady"])
def test_heap_policy_stays_small_without_evictions(name):
    """A resident cache hits forever and never evicts: every hit re-prioritises its key, and the lazy heap must not
    keep one stale entry per hit (a long resident session grew it by 192 entries a token)."""
    from moestream.policy import Belady, LFU

    keys = [(0, e) for e in range(16)]
    requests = keys * 2000
    policy = LFU() if name == "lfu" else Belady(requests)
    for k in keys:
        policy.insert(k)
    for k in requests:
        policy.access(k, True)
    assert len(policy.heap) <= 4 * len(keys) + 64
    assert policy.victim(set()) in keys  # still answers


def test_pinned_keys_stay_out_of_the_inner_policy():
    """Pinned keys never reach the inner policy: it orders only what it may evict (before, an LFU heap held every
    pinned key and each eviction stepped over them)."""
    from moestream.policy import LFU, Pinned

    pinned = [(0, e) for e in range(6)]
    policy = Pinned(LFU(), pinned)
    for k in pinned + [(0, 6), (0, 7)]:
        policy.insert(k)
    for k in [(0, 6), (0, 7), (0, 7)] + pinned * 3:
        policy.access(k, True)
    assert set(policy.inner.resident) == {(0, 6), (0, 7)}
    assert policy.victim(set()) == (0, 6)  # used once, against twice
    policy.remove((0, 6))
    policy.remove((0, 0))  # a pinned key dropped (its read failed): nothing to forget
    assert policy.victim(set()) == (0, 7) and policy.victim({(0, 7)}) is None
