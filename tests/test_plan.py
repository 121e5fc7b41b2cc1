"""The planner: sizes from real architectures, bytes from formats, and internally consistent arithmetic."""

from __future__ import annotations

import math

import pytest

from moestream.plan import make_plan, matrix_bytes, resolve_model
from moestream.presets import PRESETS
from moestream.store import Store

# Total parameters on each model card (routed + dense; DeepSeek's MTP module excluded).
CARD_TOTALS = {
    "deepseek-v3": 671e9, "deepseek-v4-flash": 284e9, "deepseek-v4-pro": 1.6e12, "kimi-k2": 1.0e12,
    "kimi-k2.5": 1.0e12, "qwen3-30b-a3b": 30.5e9, "qwen3-235b-a22b": 235e9, "qwen3.5-397b-a17b": 397e9,
    "gpt-oss-120b": 117e9, "glm-4.5": 355e9, "mixtral-8x7b": 46.7e9,
}


def test_every_preset_is_tested():
    assert set(CARD_TOTALS) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(CARD_TOTALS))
def test_preset_matches_model_card(name):
    size = resolve_model(name).size
    assert size.total_params == pytest.approx(CARD_TOTALS[name], rel=0.03)
    assert size.total_params == size.dense_params + size.moe_layers * size.experts * size.expert_params


def test_format_arithmetic():
    # DeepSeek-V3's kv_a_proj_with_mqa, 576 x 7168, FP8 with a partial 128-block edge: 5 x 56 scale blocks.
    assert matrix_bytes(576, 7168, "fp8") == 576 * 7168 + 4 * 5 * 56
    assert matrix_bytes(768, 2048, "bf16") == 2 * 768 * 2048
    assert matrix_bytes(768, 2048, "int8") == 768 * 2048 + 2 * 768
    assert matrix_bytes(768, 2048, "int4") == 768 * 2048 // 2 + 2 * 768 * 64
    assert matrix_bytes(768, 2048, "mxfp4") == 768 * 2048 // 2 + 768 * 64
    with pytest.raises(ValueError, match="unknown format"):
        matrix_bytes(1, 1, "q9")


def test_bytes_per_expert_from_shapes():
    size = resolve_model("qwen3-30b-a3b").size
    assert size.expert_shapes == {"gate_up_proj": (1536, 2048), "down_proj": (2048, 768)}
    assert size.expert_params == 3 * 2048 * 768
    assert size.expert_bytes("bf16") == 2 * 3 * 2048 * 768  # already 4 KiB aligned
    assert size.expert_bytes("int4") == math.ceil((1536 * 1024 + 2 * 1536 * 64 + 2048 * 384 + 2 * 2048 * 24)
                                                  / 4096) * 4096
    # GPT-OSS stores experts transposed (in, out): scales are grouped along the input dim all the same.
    gpt = resolve_model("gpt-oss-120b").size
    assert gpt.transposed and gpt.expert_shapes["gate_up_proj"] == (2880, 5760)
    assert gpt.expert_bytes("mxfp4") < gpt.expert_bytes("bf16") / 3.5


def test_plan_is_internally_consistent():
    p = make_plan("deepseek-v4-flash", "64GB", ssd="7GB/s", context=2048)
    s = p.size
    assert p.experts_format == "fp4" and p.dense_format == "fp8"
    assert p.fits
    assert p.memory == p.runtime_bytes + p.dense_bytes + p.kv_bytes + p.work_bytes + p.cache_bytes
    assert p.cached_experts == p.cache_bytes // p.record_bytes
    assert p.hit_rate == pytest.approx(p.cached_experts / (s.moe_layers * s.experts))
    assert p.misses_per_layer == pytest.approx(s.top_k * (1 - p.hit_rate))
    assert p.bytes_per_token == pytest.approx(s.moe_layers * p.misses_per_layer * p.record_bytes)
    io = s.moe_layers * (math.ceil(p.misses_per_layer / 8) * 0 + p.misses_per_layer * p.record_bytes / 7e9)
    assert p.tps_io_bound == pytest.approx(1 / io)
    assert p.tps_with_compute == pytest.approx(1 / (io + p.compute_seconds))
    assert p.tps_with_compute < p.tps_io_bound
    assert "decode" in p.format() and "fits            yes" in p.format()


def test_more_memory_never_predicts_slower():
    a = make_plan("qwen3-235b-a22b", "32GB", ssd="3GB/s")
    b = make_plan("qwen3-235b-a22b", "96GB", ssd="3GB/s")
    assert b.hit_rate > a.hit_rate and b.tps_io_bound > a.tps_io_bound


def test_plan_that_does_not_fit():
    p = make_plan("deepseek-v3", "16GB", ssd="7GB/s")
    assert not p.fits
    assert "NO" in p.format()


def test_plan_from_store_and_checkpoint(qwen3_store, qwen3_ckpt):
    p = make_plan(str(qwen3_store), "4GB", ssd="1GB/s")
    assert p.record_bytes == Store.open(qwen3_store).layers[0].record_bytes
    assert p.size.moe_layers == 2 and p.size.experts == 8 and p.experts_format == "fp32"
    q = make_plan(str(qwen3_ckpt), "4GB", ssd="1GB/s", experts_format="bf16")
    assert q.size.expert_params == p.size.expert_params


def test_plan_with_trace_uses_its_hit_rate(qwen3_store, tmp_path):
    import moestream

    with moestream.load(qwen3_store, cache="100KB", device="cpu", trace=True) as m:
        list(m.stream_ids([5, 17, 42, 99, 7], max_new_tokens=16, stop_at_eos=False))
        trace = m.save_trace(tmp_path / "t.npz")
    p = make_plan(str(qwen3_store), "4GB", ssd="1GB/s", trace=str(trace))
    assert "LRU replay" in p.hit_rate_source and "this model's trace" in p.hit_rate_source


def test_unknown_model_is_a_clear_error(tmp_path):
    from moestream.skeleton import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="not a preset"):
        make_plan(str(tmp_path / "nothing"), "8GB")


@pytest.mark.parametrize("depth,rounds", [(4, {1, 2, 4}), (1, {1})])
def test_probe_measures_this_disk(tmp_path, depth, rounds):
    from moestream.probe import probe

    r = probe(tmp_path, 1 << 20, queue_depth=depth, seconds=0.4, file_bytes=64 << 20)
    assert r.bandwidth > 1e6 and r.peak_bandwidth > 1e6 and r.latency >= 0
    assert set(r.rounds) == rounds  # queue depth 1 once ran rounds of 2 reads with one buffer (IndexError)
    assert list(tmp_path.iterdir()) == []  # scratch file removed
    with pytest.raises(ValueError, match="--queue-depth"):
        probe(tmp_path, 1 << 20, queue_depth=0)


def test_cli_plan(tmp_path):
    from test_cli import cli

    r = cli("plan", "--list", "x")
    assert r.returncode == 0 and "deepseek-v4-flash" in r.stdout
    r = cli("plan", "qwen3-30b-a3b", "--memory", "8GB", "--ssd", "3GB/s")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stdout and "hit rate" in r.stdout and "int4" in r.stdout
    r = cli("plan", "qwen3-30b-a3b")
    assert r.returncode == 2 and "--memory" in r.stderr
