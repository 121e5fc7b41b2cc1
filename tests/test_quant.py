"""Opt-in lossy expert formats: exact where they should be, labelled, and their cost measured."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import moestream
from moestream.convert import convert
from moestream.demo import bundled_model
from moestream.evaluate import evaluate
from moestream.quant import dequantize, quantize
from moestream.store import Store


def test_int4_packing_is_exact_on_representable_values():
    torch.manual_seed(0)
    scales = 2.0 ** torch.randint(-6, -2, (4, 2)).float()  # powers of two: exact in bf16
    vals = torch.randint(-7, 8, (4, 2, 32)).float()
    vals[:, :, 0] = 7  # each group reaches the top of the range, so amax / 7 is the scale
    w = (vals * scales[:, :, None]).view(4, 64)
    p = quantize(w, "int4", 32)
    assert p["q"].shape == (4, 32) and p["q"].dtype == torch.uint8 and p["scale"].shape == (4, 2)
    assert torch.equal(dequantize(p["q"], p["scale"], torch.float32), w)


def test_int8_error_bound():
    torch.manual_seed(0)
    w = torch.randn(32, 96)
    p = quantize(w, "int8")
    err = (dequantize(p["q"], p["scale"], torch.float32) - w).abs()
    # half a quantisation step per row, plus the bf16 rounding of the scale
    assert (err <= (w.abs().amax(1, keepdim=True) / 127) * 0.51 + w.abs() * 2**-8).all()
    with pytest.raises(ValueError, match="divide"):
        quantize(torch.randn(4, 40), "int4", 32)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    src = str(bundled_model())
    return {f: convert(src, root / f, progress=False, experts=None if f == "exact" else f)
            for f in ("exact", "int8", "int4", "int4z")}


def test_quantised_stores_are_smaller_and_labelled(stores):
    size = {f: Store.open(p).expert_bytes for f, p in stores.items()}
    assert size["int8"] < 0.55 * size["exact"] and size["int4"] < 0.32 * size["exact"]
    assert Store.open(stores["int4"]).meta["quant"]["experts"] == "int4_g32"
    assert Store.open(stores["int8"]).meta["quant"]["experts"] == "int8_channel"
    with moestream.load(stores["int4"], cache="2MB", device="cpu") as m:
        list(m.stream("def f(x):", max_new_tokens=4, chat=False))
        assert "LOSSY" in m.stats.format() and "int4_g32" in m.stats.format()
    with moestream.load(stores["exact"], cache="2MB", device="cpu") as m:
        list(m.stream("def f(x):", max_new_tokens=4, chat=False))
        assert "LOSSY" not in m.stats.format()


def test_int4z_round_trip_and_error_bound():
    """A zero point per group maps each group's min..max onto 0..15: half a step of error, and a group of
    all-positive values keeps its full 16 levels (symmetric int4 would spend half of them on negatives)."""
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[0] = w[0].abs() + 1  # one row entirely positive
    p = quantize(w, "int4z", 32)
    assert p["zero"].dtype == torch.uint8 and p["zero"].shape == (8, 2) and p["q"].shape == (8, 32)
    back = dequantize(p["q"], p["scale"], torch.float32, p["zero"])
    step = p["scale"].float().repeat_interleave(32, 1)
    assert ((back - w).abs() <= step * 0.5 + w.abs() * 2**-7 + 1e-6).all()
    sym = dequantize(*quantize(w, "int4", 32).values(), torch.float32)
    assert (back[0] - w[0]).abs().mean() < (sym[0] - w[0]).abs().mean()


@pytest.mark.parametrize("scheme", ["int8", "int4z", "int4"])
def test_quantised_store_computes_exactly_its_dequantised_weights(scheme, stores, monkeypatch):
    """The runtime's compact path (torch's packed int8 matmul, the compiled int4z kernel, int4's whole-expert
    kernels) equals transformers' model holding the same dequantised weights, in a prefill and in each
    one-token step."""
    from transformers import DynamicCache

    from moestream import kernels, runtime
    from moestream.quant import Int8Weight

    calls = []
    cls, fn = {"int8": (Int8Weight, "linear"), "int4z": (kernels.GroupedWeight, "linear"),
               "int4": (runtime, "silu_mlp")}[scheme]
    real = getattr(cls, fn)
    monkeypatch.setattr(cls, fn, lambda *a: calls.append(1) or real(*a))
    ref = AutoModelForCausalLM.from_pretrained(bundled_model(), experts_implementation="eager",
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in ref.model.layers:
            ex = layer.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(ex, name)
                for e in range(p.shape[0]):
                    q = quantize(p[e].to(torch.bfloat16), scheme)
                    p[e] = dequantize(q["q"], q["scale"], torch.float32, q.get("zero"))
    ids = torch.tensor([[5, 300, 1200, 42, 77, 9, 2048, 13]])
    budget = Store.open(stores[scheme]).expert_bytes // 4  # a quarter of the experts: evictions
    with moestream.load(stores[scheme], cache=budget, dtype="float32", device="cpu") as m:
        with torch.no_grad():
            assert (ref(ids).logits - m.model(ids).logits).abs().max().item() <= 1e-4
            caches = DynamicCache(config=ref.config), DynamicCache(config=m.model.config)
            for i in range(ids.shape[1]):  # one-token steps (decode), each against the reference's
                want, got = (model(ids[:, i:i + 1], past_key_values=c).logits for model, c in zip((ref, m.model), caches))
                assert (want - got).abs().max().item() <= 1e-4
        assert m.cache.total().evictions > 0
    assert calls  # the compact kernel did the work


def held_out_text(chars: int = 20000) -> str:
    """Text the bundled model never trained on: its training script's held-out standard-library files."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from train_tiny_moe import corpus_files, held_out

    files = [f for f in corpus_files() if held_out(f)][:2]
    return "".join(f.read_text(encoding="utf-8", errors="replace")[:chars] for f in files)


def test_eval_kl_bounds(stores, tmp_path):
    text = held_out_text()
    opts = dict(cache="64MB", device="cpu")
    with moestream.load(stores["exact"], **opts) as ref:
        scores = {}
        for f in ("exact", "int8", "int4", "int4z"):
            with moestream.load(stores[f], **opts) as m:
                scores[f] = evaluate(m, text, ref, window=256, max_tokens=2048)
    assert scores["exact"]["kl"] == 0 and scores["exact"]["top1_agreement"] == 1
    assert all(math.isfinite(s["kl"]) and math.isfinite(s["perplexity"]) for s in scores.values())
    assert 0 < scores["int8"]["kl"] < scores["int4"]["kl"] / 3
    assert scores["int4"]["kl"] < 0.05 and scores["int4"]["top1_agreement"] > 0.9
    assert scores["int8"]["kl"] < scores["int4z"]["kl"] < 0.05 and scores["int4z"]["top1_agreement"] > 0.9
    print({f: round(s["kl"], 5) for f, s in scores.items()})
    (tmp_path / "t.txt").write_text(text)
    from test_cli import cli

    r = cli("eval", stores["int4"], "--text", tmp_path / "t.txt", "--against", stores["exact"], "--max-tokens",
            512, "--cache", "64MB", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["experts_format"] == "int4_g32" and d["tokens"] == 512 and d["kl"] > 0


@pytest.mark.parametrize("scheme", ["int4", "int4z", "int8_g32"])
@pytest.mark.parametrize("tokens", [1, 3, 20, 40])
def test_grouped_kernels_compute_the_dequantised_product(scheme, tokens, monkeypatch):
    """The CPU kernels (C where they build, compiled, and the eager fallback) equal F.linear on the expanded
    matrix; 40 tokens pass even the C kernels' token-by-token limit."""
    from moestream import ckernels, kernels
    from moestream.kernels import GroupedWeight
    from moestream.quant import dequantize

    torch.manual_seed(0)
    w = torch.randn(96, 128)
    zero = None
    if scheme.startswith("int4"):
        p = quantize(w, scheme, 32)
        q, scale, zero = p["q"], p["scale"].half(), p.get("zero")
    else:  # Q8_0's layout: int8 with one fp16 scale per 32
        scale = (w.view(96, 4, 32).abs().amax(-1) / 127).half()
        q = torch.round(w.view(96, 4, 32) / scale.float()[:, :, None]).clamp(-127, 127).to(torch.int8).view(96, 128)
    x = torch.randn(tokens, 128)
    want = F.linear(x, dequantize(q, scale, torch.float32, zero))
    weight = GroupedWeight(q, scale, "uint4" if zero is not None else "int4",
                           None if zero is None else zero.to(torch.float32))
    torch.testing.assert_close(weight.linear(x), want, rtol=1e-5, atol=1e-4)
    if tokens > kernels.rowwise_limit(weight):  # the expanded path, also ten rows at a time (the last chunk shorter)
        monkeypatch.setattr(kernels, "EXPAND_BYTES", 10 * 128 * 4)
        torch.testing.assert_close(weight.linear(x), want, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(kernels._Compiled, "failed", "simulated: no compiler")
    monkeypatch.setattr(ckernels, "_lib", None)
    monkeypatch.setattr(ckernels, "_tried", True)
    torch.testing.assert_close(weight.linear(x), want, rtol=1e-5, atol=1e-4)


def test_int4_store_runs_the_grouped_kernel(stores, monkeypatch):
    """Decode takes the kernel reading each expert straight from its record (ckernels.record_mlp, where the C
    kernels build), short prefills the whole-expert kernel (kernels.silu_mlp), long prefills (more tokens per
    expert than kernels.rowwise_limit) the expanded one; all give the logits of the two-call path, and decode
    without the C kernels the same tokens."""
    from moestream import ckernels, kernels, runtime
    from moestream.kernels import GroupedWeight

    fused, linear, record = [], [], []
    real_mlp, real_linear, real_record = runtime.silu_mlp, GroupedWeight.linear, ckernels.record_mlp
    monkeypatch.setattr(runtime, "silu_mlp", lambda x, g, d: fused.append(x.shape[0]) or real_mlp(x, g, d))
    monkeypatch.setattr(GroupedWeight, "linear", lambda self, x: linear.append(x.shape[0]) or real_linear(self, x))
    monkeypatch.setattr(ckernels, "record_mlp", lambda *a: record.append(1) or real_record(*a))
    ids = torch.tensor([list(range(5, 205))])
    with moestream.load(stores["int4"], cache="2MB", device="cpu", dtype="float32") as m:
        tokens = list(m.stream_ids([1, 2, 3], 6, stop_at_eos=False))
        assert bool(record) == ckernels.available()
        with torch.no_grad():
            got = m.model(ids).logits
        assert 1 in fused and max(linear) > kernels.C_ROWS
        for mod in m.model.modules():
            if hasattr(mod, "_moestream"):
                mod._moestream.silu_gated, mod._moestream.layout = False, None
        with torch.no_grad():
            torch.testing.assert_close(m.model(ids).logits, got, rtol=0, atol=1e-4)
        monkeypatch.setattr(ckernels, "_lib", None)  # torch's kernels only
        assert list(m.stream_ids([1, 2, 3], 6, stop_at_eos=False)) == tokens


@pytest.fixture(scope="module")
def dense_int8_store(tmp_path_factory):
    return convert(str(bundled_model()), tmp_path_factory.mktemp("dq") / "store", progress=False, dense="int8")


def test_dense_int8_computes_its_dequantised_weights(dense_int8_store):
    """--dense int8: every eligible nn.Linear runs torch's packed int8 matmul on exactly the stored
    int8 weights and scales (compared with transformers' model holding them dequantised)."""
    from moestream.quant import Int8Linear, int8_linears

    ref = AutoModelForCausalLM.from_pretrained(bundled_model(), experts_implementation="eager",
                                               dtype=torch.float32).eval()
    names = int8_linears(ref)
    assert "lm_head" in names and any("self_attn.q_proj" in n for n in names)
    with torch.no_grad():
        for n in names:
            w = ref.get_submodule(n).weight
            q = quantize(w.to(torch.bfloat16), "int8")
            w.copy_(dequantize(q["q"], q["scale"], torch.float32))
    s = Store.open(dense_int8_store)
    assert s.meta["quant"]["dense"] == "int8_channel"
    ids = torch.tensor([[5, 300, 1200, 42, 77, 9, 2048, 13]])
    with moestream.load(dense_int8_store, cache="3MB", dtype="float32", device="cpu") as m:
        assert sum(isinstance(mod, Int8Linear) for mod in m.model.modules()) == len(names)
        with torch.no_grad():
            assert (ref(ids).logits - m.model(ids).logits).abs().max().item() <= 1e-3
        list(m.stream("def f(x):", max_new_tokens=4, chat=False))
        assert "dense format         int8_channel (LOSSY" in m.stats.format()


def test_dense_int8_is_smaller_and_close(dense_int8_store, stores):
    exact, small = Store.open(stores["exact"]), Store.open(dense_int8_store)
    assert small.dense_bytes < 0.75 * exact.dense_bytes  # the bf16 embedding (a third of it) stays as it is
    opts = dict(cache="64MB", device="cpu")
    with moestream.load(stores["exact"], **opts) as ref, moestream.load(dense_int8_store, **opts) as m:
        score = evaluate(m, held_out_text(), ref, window=256, max_tokens=1024)
    assert 0 < score["kl"] < 0.02 and score["top1_agreement"] > 0.95


@pytest.mark.parametrize("c_kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matvec_linear_matches_f_linear(dtype, c_kernels, monkeypatch):
    """The one-token dense product (the C kernel where it builds, else the compiled one) sums the same
    half-precision products in float32 as F.linear; 96 columns: a tail past the C kernel's 64-wide steps."""
    from moestream import ckernels
    from moestream.kernels import MatvecLinear

    if c_kernels and not ckernels.available():
        pytest.skip("no AVX-512 CPU or no C compiler")
    if not c_kernels:
        monkeypatch.setattr(ckernels, "_lib", None)
        monkeypatch.setattr(ckernels, "_tried", True)
    torch.manual_seed(0)
    lin = MatvecLinear(96, 40, bias=True, dtype=dtype)
    for x in (torch.randn(1, 1, 96, dtype=dtype), torch.randn(3, 96, dtype=dtype)):  # decode, and a chunk
        want = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        got = lin(x)
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    x = torch.randn(1, 96, dtype=dtype)
    assert not torch.equal(lin(x), F.linear(x, lin.weight * 0, lin.bias))  # it does multiply


def test_bf16_runtime_uses_matvec_linears_with_the_same_tokens(qwen3_store, monkeypatch):
    """A bf16 load on CPU swaps the dense linears for MatvecLinear and makes the routers' weights MatvecWeights;
    decoding matches F.linear's."""
    from moestream.kernels import MatvecLinear, MatvecWeight

    prompt = [5, 17, 42, 8]
    with moestream.load(qwen3_store, device="cpu", dtype="bfloat16") as m:
        swapped = [n for n, mod in m.model.named_modules() if isinstance(mod, MatvecLinear)]
        assert any(n.endswith("self_attn.q_proj") for n in swapped) and any(n.endswith("lm_head") for n in swapped)
        routers = [layer.mlp.gate for layer in m.model.model.layers if hasattr(layer.mlp, "experts")]
        assert routers and all(isinstance(r.weight, MatvecWeight) for r in routers)
        fast = list(m.stream_ids(prompt, max_new_tokens=8, stop_at_eos=False))
        monkeypatch.setattr(MatvecLinear, "forward", torch.nn.Linear.forward)
        monkeypatch.setattr(MatvecWeight, "__torch_function__", classmethod(
            lambda cls, func, types, args=(), kwargs=None: torch._C._disabled_torch_function_impl(
                func, types, args, kwargs or {})))
        plain = list(m.stream_ids(prompt, max_new_tokens=8, stop_at_eos=False))
    assert fast == plain


def test_matvec_weight_routes_one_token_through_the_matvec():
    """F.linear on a MatvecWeight: one CPU token through the float32-summing matvec, anything else as torch does."""
    from moestream import kernels
    from moestream.kernels import MatvecWeight

    torch.manual_seed(0)
    w = torch.randn(24, 80, dtype=torch.bfloat16)
    mw = MatvecWeight(w.clone(), requires_grad=False)
    x = torch.randn(1, 1, 80, dtype=torch.bfloat16)
    got = F.linear(x, mw)
    assert type(got) is torch.Tensor and got.dtype == torch.bfloat16 and got.shape == (1, 1, 24)
    torch.testing.assert_close(got, kernels.half_matvec(x.view(1, -1), w).to(torch.bfloat16).view(1, 1, 24),
                               rtol=0, atol=0)
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)
    chunk = torch.randn(3, 80, dtype=torch.bfloat16)
    torch.testing.assert_close(F.linear(chunk, mw), F.linear(chunk, w), rtol=0, atol=0)
    assert type(mw.float()) is torch.Tensor


def test_int8_activations_are_close_labelled_and_opt_in(stores, monkeypatch, tmp_path):
    """--activations int8 (lossy): teacher-forced one-token steps of the int4 store stay within a small KL of
    the exact activations and pick the same tokens, yet differ (the int8 kernel ran); the stats say LOSSY;
    stores whose experts the kernel cannot take are refused with the flag named."""
    from transformers import DynamicCache

    from moestream import ckernels

    if not ckernels.int8_available():
        with pytest.raises(ValueError, match="--activations int8"):
            moestream.load(stores["int4"], cache="2MB", device="cpu", activations="int8")
        pytest.skip("no AVX-512 VNNI: int8 activations refused (checked above)")
    calls = []
    real = ckernels.record_mlp
    monkeypatch.setattr(ckernels, "record_mlp", lambda *a: calls.append(a[-1]) or real(*a))

    def steps(activations: str) -> torch.Tensor:
        with moestream.load(stores["int4"], cache="2MB", device="cpu", dtype="float32", activations=activations) as m:
            ids, out = list(range(5, 40)), []
            with torch.no_grad():
                cache = DynamicCache(config=m.model.config)
                m.model(torch.tensor([ids[:4]]), cache=cache, use_cache=True)
                for t in ids[4:]:
                    out.append(m.model(torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, -1])
            if activations == "int8":
                list(m.stream_ids([1, 2, 3], 3, stop_at_eos=False))
                assert m.stats.activations == "int8" and "activations          int8 (LOSSY" in m.stats.format()
            return torch.stack(out)

    exact = steps("float")
    assert set(calls) == {False}
    calls.clear()
    rounded = steps("int8")
    assert set(calls) == {True}
    kl = F.kl_div(rounded.log_softmax(-1), exact.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert kl.mean() < 1e-3 and (rounded.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
    assert (rounded - exact).abs().max() > 1e-4
    with pytest.raises(ValueError, match="--activations int8.*groups of 32"):
        moestream.load(stores["exact"], cache="2MB", device="cpu", activations="int8")
    with pytest.raises(ValueError, match="--activations 'int4'"):
        moestream.load(stores["int4"], cache="2MB", device="cpu", activations="int4")
