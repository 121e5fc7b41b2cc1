"""The bundled, trained tiny-moe: it learned something, it streams exactly, its routing has structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import moestream
from moestream.demo import bundled_model
from moestream.simulate import simulate
from moestream.trace import Trace

DATA = Path(__file__).parent / "data"
PROMPT = "def read_config(path):\n    "


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    return moestream.convert.convert(str(bundled_model()), tmp_path_factory.mktemp("tiny") / "store", progress=False)


def test_bundled_model_is_small_and_learned():
    path = bundled_model()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 30 * 10**6
    report = json.loads((path / "training.json").read_text())
    # Clearly below the tokenizer's unigram baseline on held-out files.
    assert report["held_out_loss"] < report["unigram_baseline"] - 1.5
    assert report["held_out_files"] > 10 and report["train_files"] > 10 * report["held_out_files"]


def test_streamed_equals_resident(tiny_store):
    path = bundled_model()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT)["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager", dtype=torch.float32).eval()
    gc = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), generation_config=gc)[0, len(ids):].tolist()
        want_logits = ref(torch.tensor([ids])).logits
    budget = moestream.store.Store.open(tiny_store).expert_bytes // 4
    with moestream.load(tiny_store, cache=budget, dtype="float32", device="cpu") as m:
        with torch.no_grad():
            assert (m.model(torch.tensor([ids])).logits - want_logits).abs().max().item() <= 1e-4
        got = list(m.stream_ids(ids, max_new_tokens=32, stop_at_eos=False))
        assert got == want
        assert m.stats.decode.evictions > 0 and m.stats.decode.misses > 0
    text = tok.decode(want)
    assert len(set(want)) > 8, text  # it writes something, not one token repeated


def test_shipped_trace_has_real_routing_structure():
    t = Trace.load(DATA / "tiny-moe-trace.npz")
    assert t.meta["model_type"] == "qwen3_moe" and t.decode_tokens > 500
    experts = int(t.num_experts[0])
    # Popular experts: the busiest quarter of each layer's experts takes well over a quarter of the picks.
    shares = []
    for c in range(len(t.layers)):
        counts = np.bincount(t.experts[:, c].ravel(), minlength=experts)
        shares.append(np.sort(counts)[::-1][: experts // 4].sum() / counts.sum())
    assert min(shares) > 0.3
    # Locality across tokens: an LRU cache of a quarter of the experts hits more than a quarter of the time.
    quarter = int(t.record_bytes[0]) * experts * len(t.layers) // 4
    lru = simulate(t, quarter, "lru")
    assert lru.hit_rate > 0.3
    assert simulate(t, quarter, "belady").hits >= max(lru.hits, simulate(t, quarter, "lfu").hits)


def test_run_without_model_uses_bundled(tmp_path):
    from test_cli import cli

    r = cli("run", "--help")
    assert "tiny-moe" in r.stdout
    stats = tmp_path / "s.json"
    r = cli("demo", "-n", 24, "--stats-json", stats, env={"MOESTREAM_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def fibonacci(n):")
    d = json.loads(stats.read_text())
    assert d["decode"]["misses"] > 0 and d["decode"]["evictions"] > 0
    r = cli("run", "-p", "import os\n", "--raw", "-n", 8, "--cache", "4MB",
            env={"MOESTREAM_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
