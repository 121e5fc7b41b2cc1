"""Cache budget, reader (O_DIRECT fallback, --verify), memory planning, Python API."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

import moestream
from conftest import expert_bytes
from moestream.budget import MemoryBudgetError
from moestream.cache import ExpertCache
from moestream.convert import convert
from moestream.reader import RecordCorrupt, RecordReader
from moestream.sizes import parse_size
from moestream.store import Store

PROMPT = [5, 17, 42, 99, 7, 250, 3, 61, 128, 9, 77, 300]


def qwen3_store_of(tmp_path, tokenizer=None, **shape):
    """A random Qwen3-MoE checkpoint of this shape (4 heads of 16, 2 KV heads, top-2) saved under tmp_path/ckpt
    and converted to tmp_path/store."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts_per_tok=2, **shape)
    ckpt = tmp_path / "ckpt"
    Qwen3MoeForCausalLM(config).float().save_pretrained(ckpt)
    if tokenizer is not None:
        tokenizer.save_pretrained(ckpt)
    return convert(str(ckpt), tmp_path / "store", progress=False)


def test_cache_never_exceeds_budget(qwen3_store, monkeypatch):
    budget = expert_bytes(qwen3_store) // 5
    with moestream.load(qwen3_store, cache=budget, device="cpu") as m:
        checks = []
        real_fetch = ExpertCache.fetch

        def checked_fetch(self, info, experts, uses=None):
            out = real_fetch(self, info, experts, uses)  # every buffer is allocated here
            assert self.used <= self.budget
            assert sum(b.nbytes for b in self.entries.values()) == self.used
            checks.append(self.used)
            return out

        monkeypatch.setattr(ExpertCache, "fetch", checked_fetch)
        for _ in m.stream_ids(PROMPT * 3, max_new_tokens=24, stop_at_eos=False):
            assert m.cache.used <= m.cache.budget  # after every decode step
        assert m.cache.peak_used <= budget
        assert len(checks) > 24 and max(checks) > budget // 2
        assert m.cache.total().evictions > 0


def test_cache_smaller_than_a_step_processes_experts_in_groups(qwen3_store, qwen3_ckpt):
    """A budget of one record still computes exactly: the union is fetched in groups that fit."""
    from test_parity import reference

    record = Store.open(qwen3_store).layers[0].record_bytes
    with moestream.load(qwen3_store, cache=record, device="cpu") as m:
        with torch.no_grad():
            want = reference(qwen3_ckpt)(torch.tensor([PROMPT])).logits
            got = m.model(torch.tensor([PROMPT])).logits
        assert (want - got).abs().max().item() <= 1e-4
        assert m.cache.used <= record


def test_counters_per_layer_add_up(qwen3_store):
    with moestream.load(qwen3_store, cache=expert_bytes(qwen3_store) // 3, device="cpu") as m:
        list(m.stream_ids(PROMPT, max_new_tokens=8, stop_at_eos=False))
        s = Store.open(qwen3_store)
        assert set(m.cache.layers) == {i.layer for i in s.layers}
        total = m.cache.total()
        assert total.misses == sum(c.misses for c in m.cache.layers.values())
        assert total.bytes_read == (total.misses + total.prefetched) * s.layers[0].record_bytes  # guesses read too
        # Every token routes top-2 in each of the 2 MoE layers: hits + misses cover every choice at least once.
        assert total.hits + total.misses >= 2 * 2


def test_verify_detects_corrupt_record(qwen3_store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(qwen3_store, bad)
    s = Store.open(bad)
    info = s.layers[0]
    path = bad / info.path
    data = bytearray(path.read_bytes())
    for e in range(info.experts):  # flip one byte in every record of the layer
        data[e * info.record_bytes + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with moestream.load(bad, cache="1MB", device="cpu", verify=True) as m:
        with pytest.raises(RecordCorrupt) as err:
            m.model(torch.tensor([PROMPT]))
    msg = str(err.value)
    assert str(path) in msg and f"layer {info.layer}" in msg and "expert" in msg and "checksum" in msg
    # Without --verify the damage goes unseen: that is what the flag is for.
    with moestream.load(bad, cache="1MB", device="cpu") as m:
        m.model(torch.tensor([PROMPT]))


def test_filesystem_without_o_direct_falls_back(qwen3_store, qwen3_ckpt, monkeypatch):
    """Where O_DIRECT is refused (older tmpfs, some network filesystems), reads go through the page cache."""
    import errno
    import os

    from test_parity import reference

    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    with moestream.load(qwen3_store, cache=expert_bytes(qwen3_store) // 4, device="cpu") as m:
        assert m.reader.direct is False
        assert "O_DIRECT" in m.reader.fallback_reason and "Invalid argument" in m.reader.fallback_reason
        with torch.no_grad():
            want = reference(qwen3_ckpt)(torch.tensor([PROMPT])).logits
            assert (want - m.model(torch.tensor([PROMPT])).logits).abs().max().item() <= 1e-4
        assert m.cache.total().misses > 0


def test_o_direct_used_where_allowed(qwen3_store):
    import os

    s = Store.open(qwen3_store)
    try:
        os.close(os.open(s.root / s.layers[0].path, os.O_RDONLY | os.O_DIRECT))
    except OSError as e:
        pytest.skip(f"the test folder's filesystem refuses O_DIRECT: {e}")
    # This filesystem allows it, so the reader must use it.
    with moestream.load(qwen3_store, cache="1MB", device="cpu") as m:
        assert m.reader.direct is True and m.reader.fallback_reason is None


def test_reader_parallel_reads_match_file(qwen3_store):
    s = Store.open(qwen3_store)
    reader = RecordReader(s, threads=4, verify=True)
    try:
        cache = ExpertCache(reader, 10**7)
        info = s.layers[1]
        got = cache.get(info, list(range(info.experts)))
        data = (s.root / info.path).read_bytes()
        for e, buf in got.items():
            assert bytes(buf.numpy()) == data[e * info.record_bytes:(e + 1) * info.record_bytes]
        assert cache.total().misses == info.experts
        cache.get(info, [0, 1])
        assert cache.total().hits == 2
    finally:
        reader.close()


def test_reader_busy_time_counts_overlapping_reads_once(qwen3_store, monkeypatch):
    """busy_seconds is the time with any read in flight: four reads at once count once, idle time not at all."""
    import time

    import moestream.reader as rd

    def slow(fd, views, offset):
        time.sleep(0.2)
        return len(views[0])

    monkeypatch.setattr(rd.os, "preadv", slow)
    s = Store.open(qwen3_store)
    reader = RecordReader(s, threads=4, direct=False)
    try:
        info = s.layers[0]
        t0 = time.perf_counter()
        futures = [reader.submit(info, e, reader.buffer(info.record_bytes)) for e in range(4)]
        summed = sum(f.result() for f in futures)
        wall = time.perf_counter() - t0
        busy = reader.busy_seconds()
        assert summed >= 0.8 and 0.2 <= busy <= wall < summed
        time.sleep(0.2)  # idle: not counted
        assert reader.busy_seconds() == busy
    finally:
        reader.close()


def test_memory_budget_too_small_for_dense_stops_before_loading(qwen3_store, monkeypatch):
    import moestream.runtime as rt

    called = []
    monkeypatch.setattr(rt, "_fill_dense", lambda *a: called.append(1))
    with pytest.raises(MemoryBudgetError, match="dense weights need"):
        moestream.load(qwen3_store, memory="10MB", device="cpu")
    assert not called


def test_memory_budget_sets_cache_from_what_is_left(qwen3_store):
    from moestream.budget import rss_bytes

    memory = rss_bytes() + 2 * 10**9
    with moestream.load(qwen3_store, memory=memory, device="cpu", context=256) as m:
        p = m.memory
        assert p.memory == memory
        assert p.cache == min(memory - p.baseline - p.dense - p.kv - p.work, Store.open(qwen3_store).expert_bytes)
        assert m.cache.budget == p.cache


def test_sizes():
    assert parse_size("8GB") == 8 * 10**9
    assert parse_size("256MiB") == 256 * 2**20
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError, match="--memory"):
        parse_size("lots", "--memory")


def test_python_api_text(qwen3_store):
    with moestream.load(str(qwen3_store), cache="64KB", device="cpu") as m:
        text = m.generate("def add(a, b):", max_new_tokens=8, chat=False)
        assert isinstance(text, str)
        assert m.stats.generated_tokens >= 1 and m.stats.prompt_tokens > 0
        pieces = list(m.stream("hello", max_new_tokens=6, chat=True, temperature=0.8, top_p=0.9, top_k=50, seed=1))
        again = list(m.stream("hello", max_new_tokens=6, chat=True, temperature=0.8, top_p=0.9, top_k=50, seed=1))
        assert pieces == again  # seeded sampling is reproducible
        d = m.stats.to_dict()
        for k in ("ttft_seconds", "prefill_tps", "decode_tps", "hit_rate", "bytes_read", "read_mb_s",
                  "io_wait_share", "peak_rss", "decode_disk_busy_share"):
            assert k in d
        assert m.stats.decode.misses > 0 and 0 < d["decode_disk_busy_share"] <= 1  # a 64 KB cache misses


def test_prefetch_only_loads(qwen3_store, monkeypatch):
    """--prefetch lookahead starts reads early; tokens and logits are the same bits as without it."""
    runs = {}
    record = Store.open(qwen3_store).layers[0].record_bytes
    # per-layer: each of the 2 MoE layers holds 2 records, one top-2 request: a wrong guess still being read
    # leaves the next request no victim until it lands (the cache waits for it)
    for mode, scope, budget in [("none", "global", expert_bytes(qwen3_store) // 2),
                                ("lookahead", "global", expert_bytes(qwen3_store) // 2),
                                ("auto", "global", expert_bytes(qwen3_store) // 2),
                                ("lookahead", "per-layer", 4 * record)]:
        mode = mode if scope == "global" else "per-layer"
        with moestream.load(qwen3_store, cache=budget, device="cpu", prefetch=mode.replace("per-layer", "lookahead"),
                            cache_scope=scope) as m:
            with torch.no_grad():
                logits = m.model(torch.tensor([PROMPT])).logits
            m.cache.clear()
            used = []
            tokens = []
            for t in m.stream_ids(PROMPT, max_new_tokens=24, stop_at_eos=False):
                tokens.append(t)
                used.append(m.cache.used)
            assert max(used) <= budget and m.cache.peak_used <= budget
            if scope == "per-layer":
                assert m.cache.layer_budget == {0: 2 * record, 2: 2 * record}
                assert all(v <= 2 * record for v in m.cache.layer_used.values())
            runs[mode] = (logits, tokens, m.cache.total())
    for mode in ("lookahead", "auto", "per-layer"):
        assert torch.equal(runs["none"][0], runs[mode][0]) and runs["none"][1] == runs[mode][1], mode
        c = runs[mode][2]
        assert mode == "auto" or c.prefetched > 0 and 0 <= c.prefetch_used <= c.prefetched
    assert runs["none"][2].prefetched == 0


def test_landed_guesses_leave_the_in_flight_list(qwen3_store):
    """A guess whose read has ended is forgotten by the next request while its record stays cached; before, every
    wrong guess stayed in `inflight` for good (in a cache with room to spare nothing evicted them) and each
    request scanned them all."""
    from concurrent.futures import wait

    with moestream.load(qwen3_store, cache=expert_bytes(qwen3_store), device="cpu", prefetch="lookahead") as m:
        for _ in m.stream_ids(PROMPT, max_new_tokens=12, stop_at_eos=False):
            pass
        wait(list(m.cache.inflight.values()))
        m.cache.get(m.store.layers[0], [0])
        assert m.cache.unused_prefetch  # wrong guesses, read and kept
        assert m.cache.inflight == {}
        assert all(k in m.cache.entries for k in m.cache.unused_prefetch)


def test_prefetched_corrupt_record_is_still_caught(qwen3_store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(qwen3_store, bad)
    info = Store.open(bad).layers[1]  # the second MoE layer: the one the prefetcher reads ahead
    path = bad / info.path
    data = bytearray(path.read_bytes())
    for e in range(info.experts):
        data[e * info.record_bytes + 8] ^= 0x55
    path.write_bytes(bytes(data))
    with moestream.load(bad, cache="1MB", device="cpu", verify=True, prefetch="lookahead") as m:
        with pytest.raises(RecordCorrupt, match=f"layer {info.layer}"):
            m.model(torch.tensor([PROMPT]))


def test_dense_weights_are_read_once_into_place(tmp_path, tokenizer):
    """Loading holds the dense weights once: no mmap'd file pages beside the copy (which doubled the
    dense part at load and broke --memory: seen 2.32 GB peak under a 2.15 GB budget)."""
    import subprocess
    import sys

    store = qwen3_store_of(tmp_path, vocab_size=40000, hidden_size=512, moe_intermediate_size=64, num_hidden_layers=1,
                           num_experts=4, tie_word_embeddings=False)
    dense = Store.open(store).dense_bytes
    assert dense > 150e6
    code = ("import moestream; from moestream.budget import rss_bytes, peak_rss_bytes; import torch\n"
            f"before = rss_bytes(); m = moestream.load({str(store)!r}, cache='1MB', progress=False, device='cpu')\n"
            "print(before, peak_rss_bytes())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    before, peak = int(out[-2]), int(out[-1])
    assert peak - before < dense + 64e6, (peak - before, dense)
    from safetensors.torch import load_file

    with moestream.load(store, cache="1MB", progress=False, device="cpu") as m:
        want = load_file(store / "dense.safetensors")
        got = m.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())


def test_read_into_converts_in_chunks(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from moestream import safetensors_io

    t = {"a": torch.randn(1000, 7), "b": torch.arange(10, dtype=torch.int64)}
    save_file(t, tmp_path / "x.safetensors")
    monkeypatch.setattr(safetensors_io, "READ_CHUNK", 256)  # many chunks per tensor
    out = {"a": torch.empty(1000, 7, dtype=torch.bfloat16), "b": torch.empty(10, dtype=torch.int64)}
    assert sorted(safetensors_io.read_into(tmp_path / "x.safetensors", lambda n, d, s: out[n])) == ["a", "b"]
    assert torch.equal(out["a"], t["a"].bfloat16()) and torch.equal(out["b"], t["b"])


def test_large_temporaries_are_given_back_after_use():
    """glibc keeps freed expert-sized blocks resident once its dynamic mmap threshold has risen (the
    2 GB run 250 MB over budget); load() pins the threshold so they go back to the system."""
    from moestream.budget import return_large_frees, rss_bytes

    if not return_large_frees():
        pytest.skip("malloc is not glibc's: no mmap threshold to set")
    before = rss_bytes()
    for mb in (13, 12, 13, 12):  # sizes of a Qwen3-30B-shaped expert expanded to float32
        t = torch.empty(mb * 2**20 // 4).fill_(1.0)
        del t
    assert rss_bytes() - before < 4 * 2**20


def test_cache_buffers_reserved_at_load_and_reused(qwen3_store, monkeypatch):
    """The whole budget's record buffers are made at load; decoding then allocates no new one."""
    budget = expert_bytes(qwen3_store) // 3
    with moestream.load(qwen3_store, cache=budget, device="cpu") as m:
        record = m.store.layers[0].record_bytes
        assert len(m.cache.spare) == budget // record
        made = []
        real = m.reader.buffer
        monkeypatch.setattr(m.reader, "buffer", lambda n, populate=False: made.append(n) or real(n, populate))
        list(m.stream_ids([5, 17, 42, 8], max_new_tokens=6, stop_at_eos=False))
        assert m.cache.total().misses > 0 and made == []
        assert m.cache.used + sum(b.nbytes for b in m.cache.spare) <= budget
        m.cache.clear()  # the reserved buffers are slices of one mapping: back to spare, not lost
        assert len(m.cache.spare) == budget // record and m.cache.used == 0
    with moestream.load(qwen3_store, cache=budget, device="cpu", reserve=False) as m:
        assert m.cache.spare == []


def vma_flags(addr: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `addr` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


needs_thp = pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                               reason="this kernel has no transparent huge pages")


@needs_thp
def test_huge_region_is_aligned_and_advised_only_inside():
    from moestream.reader import HUGE_PAGE, huge_region

    r = huge_region(3 * HUGE_PAGE + 4096)
    assert r.numel() == 3 * HUGE_PAGE + 4096 and r.data_ptr() % HUGE_PAGE == 0
    assert "hg" in vma_flags(r.data_ptr()) and "hg" in vma_flags(r.data_ptr() + 3 * HUGE_PAGE - 1)
    assert "hg" not in vma_flags(r.data_ptr() + 3 * HUGE_PAGE)  # the part-page tail stays on 4 KB pages
    if r.data_ptr() > r._base.data_ptr():  # the slack before the 2 MiB boundary, where the mapping has one (else
        assert "hg" not in vma_flags(r.data_ptr() - 1)  # the byte before is another mapping's, maybe advised too)
    r.fill_(7)
    assert int(r.sum()) == 7 * r.numel()


@needs_thp
def test_dense_weights_and_cache_on_huge_pages_keep_results_and_ties(tmp_path, tokenizer, monkeypatch):
    """Every dense tensor moved into the huge-page region (threshold lowered to take the tiny model's), tied
    embeddings still one tensor, the cache's reserved buffers in a region too, logits those of transformers."""
    from moestream import runtime
    from test_parity import reference

    monkeypatch.setattr(runtime, "HUGE_DENSE_MIN", 0)
    store = qwen3_store_of(tmp_path, tokenizer, vocab_size=16384, hidden_size=64, moe_intermediate_size=32,
                           num_hidden_layers=2, num_experts=8, tie_word_embeddings=True)
    ckpt = tmp_path / "ckpt"
    with moestream.load(store, cache=expert_bytes(store) // 2, device="cpu", progress=False) as m:
        model = m.model
        assert model.lm_head.weight is model.model.embed_tokens.weight
        ptrs = sorted(p.data_ptr() for p in model.parameters())
        assert "hg" in vma_flags(ptrs[0])  # the region starts with whole huge pages (the 4 MB embedding)
        assert ptrs[-1] - ptrs[0] < sum(p.nbytes + 64 for p in model.parameters())  # one region, packed
        assert m.cache.spare and all(b.tensor.data_ptr() % 4096 == 0 for b in m.cache.spare)
        spare = sorted(b.tensor.data_ptr() for b in m.cache.spare)
        record = m.store.layers[0].record_bytes
        assert all(b - a == record for a, b in zip(spare, spare[1:]))  # slices of one mapping
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            got = model(ids).logits
            want = reference(ckpt)(ids).logits
        assert (want - got).abs().max().item() <= 1e-4


def held_guesses(monkeypatch):
    """Guesses read on one thread (set before the model loads), each held there until the returned event is set;
    `started` lists the experts whose guessed read began."""
    import threading

    monkeypatch.setattr("moestream.reader.GUESS_THREADS", 1)
    gate, real, started = threading.Event(), RecordReader.read, []

    def slow(self, i, e, buf):
        if threading.current_thread().name.startswith("moestream-guess"):
            started.append(e)
            gate.wait(10)
        return real(self, i, e, buf)

    monkeypatch.setattr(RecordReader, "read", slow)
    return gate, started


def test_unstarted_wrong_guesses_are_cancelled_and_their_buffers_kept(qwen3_store, monkeypatch):
    """Guesses read on GUESS_THREADS threads of their own: when their layer asks for other experts, those whose read
    has not started are dropped (their reserved buffers back to spare, the budget's bytes as before), those reading
    finish and stay, and the requested records are read beside them, exact."""
    budget = expert_bytes(qwen3_store) // 2
    gate, started = held_guesses(monkeypatch)
    with moestream.load(qwen3_store, cache=budget, device="cpu") as m:
        info = m.store.layers[1]
        total = lambda: m.cache.used + sum(b.nbytes for b in m.cache.spare)
        before, spare = total(), len(m.cache.spare)
        m.cache.prefetch(info, [0, 1, 2], keep=[])
        while not started:
            time.sleep(0.01)
        assert started == [0] and len(m.cache.spare) == spare - 3
        f = m.cache.fetch(info, [3, 4])  # 1 and 2 never started: cancelled
        c = m.cache.layers[info.layer]
        assert c.prefetch_cancelled == 2 and c.prefetched == 1
        assert (info.layer, 1) not in m.cache.entries and (info.layer, 2) not in m.cache.entries
        gate.set()
        got = dict(f.arrivals())
        assert sorted(got) == [3, 4] and total() == before and len(m.cache.spare) == spare - 3
        raw = (m.store.root / info.path).read_bytes()
        for e, record in [*got.items(), (0, m.cache.get(info, [0])[0])]:  # the guess that ran: a hit now
            assert bytes(record.numpy()) == raw[e * info.record_bytes:(e + 1) * info.record_bytes]
        assert c.hits == 1 and c.prefetch_used == 1


def test_a_requested_guess_still_queued_is_read_at_once(qwen3_store, monkeypatch):
    """A layer asking for a guessed expert whose read waits behind other guesses reads it on the requests' threads
    now, instead of waiting behind them; it still counts as a guess used, read once."""
    from concurrent.futures import wait

    gate, started = held_guesses(monkeypatch)
    with moestream.load(qwen3_store, cache=expert_bytes(qwen3_store) // 2, device="cpu") as m:
        info = m.store.layers[1]
        m.cache.prefetch(info, [0, 1, 2], keep=[])
        while not started:
            time.sleep(0.01)
        f = m.cache.fetch(info, [2, 5])  # 2: guessed, queued behind 0
        done, _ = wait(list(f.pending), timeout=5)  # before: 2 waited for the gate
        assert len(done) == 2 and started == [0]
        gate.set()
        got = dict(f.arrivals())
        raw = (m.store.root / info.path).read_bytes()
        for e in (2, 5):
            assert bytes(got[e].numpy()) == raw[e * info.record_bytes:(e + 1) * info.record_bytes]
        c = m.cache.layers[info.layer]
        assert c.prefetch_used == 1 and c.misses == 1 and c.prefetched == 2 and c.prefetch_cancelled == 1
        assert c.bytes_read == 3 * info.record_bytes  # 0, 2 and 5 once each (1 cancelled)


def test_a_guess_keeps_the_guesses_whose_layer_has_not_asked(qwen3_store):
    """A guess never evicts another guess whose layer has not asked since (a record just read is among LFU's least
    used: it would go first); once that layer has asked, its guesses it did not want may go."""
    from concurrent.futures import wait

    record = Store.open(qwen3_store).layers[0].record_bytes
    with moestream.load(qwen3_store, cache=3 * record, device="cpu", reserve=False) as m:
        a, b = m.store.layers[0], m.store.layers[1]
        assert a.record_bytes == b.record_bytes == record
        m.cache.prefetch(a, [0, 1], keep=[])
        wait(list(m.cache.inflight.values()))
        m.cache.prefetch(b, [0, 1, 2], keep=[])  # room for one: 0; 1 and 2 would evict a's guesses
        wait(list(m.cache.inflight.values()))
        assert set(m.cache.entries) == {(a.layer, 0), (a.layer, 1), (b.layer, 0)}
        assert m.cache.layers[b.layer].prefetched == 1
        m.cache.get(a, [0])  # a asked for 0, not 1: its guess 1 was wrong
        m.cache.prefetch(b, [1], keep=[])
        wait(list(m.cache.inflight.values()))
        assert set(m.cache.entries) == {(a.layer, 0), (b.layer, 0), (b.layer, 1)}


def test_auto_prefetch_guesses_only_where_the_cache_misses_on_its_own(qwen3_store):
    """--prefetch auto guesses a layer's experts only while the cache held, unguessed, under AUTO_PREFETCH_BELOW
    of that layer's recent requests (ExpertCache.organic, a moving average updated at each request)."""
    from moestream.runtime import AUTO_PREFETCH_BELOW

    with moestream.load(qwen3_store, cache=expert_bytes(qwen3_store) // 2, device="cpu", prefetch="auto") as m:
        layers = [i.layer for i in m.store.layers]
        for recent, guesses in ((1.0, False), (0.0, True)):
            m.cache.clear()
            m.cache.reset_counters()
            m.cache.organic = dict.fromkeys(layers, recent)
            with torch.no_grad():
                m.model(torch.tensor([[5]]))  # a cold cache: every layer misses
            assert (m.cache.total().prefetched > 0) == guesses
            # the cold cache held none of each layer's request (guessed records do not count): each average moved
            # a quarter of the way to 0, and 0.75 stays above the threshold
            assert m.cache.organic == pytest.approx(dict.fromkeys(layers, 0.75 * recent))
        m.cache.organic = dict.fromkeys(layers, AUTO_PREFETCH_BELOW)  # at the threshold: no guess
        m.cache.clear()
        m.cache.reset_counters()
        with torch.no_grad():
            m.model(torch.tensor([[5]]))
        assert m.cache.total().prefetched == 0
