"""decode.py's one-token layer forward: the same bits as transformers' modules with moestream's kernels."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import DynamicCache

import moestream
from moestream import ckernels
from moestream.convert import convert
from moestream.decode import lean_forward

pytestmark = pytest.mark.skipif(not ckernels.available(), reason="the C kernels need an AVX-512 CPU")


def half_store(tmp_path_factory, tokenizer, dtype: torch.dtype):
    """A half-precision Qwen3-MoE with int4 experts (groups of 32): the make-up the lean forward takes. Layer 1 is a
    dense MLP layer."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=320, hidden_size=128, intermediate_size=96, moe_intermediate_size=64,
                            num_hidden_layers=3, mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, num_experts=8, num_experts_per_tok=2, initializer_range=0.2,
                            tie_word_embeddings=False, eos_token_id=0)
    path = tmp_path_factory.mktemp("lean")
    Qwen3MoeForCausalLM(config).to(dtype).save_pretrained(path / "ckpt")
    tokenizer.save_pretrained(path / "ckpt")
    return convert(str(path / "ckpt"), path / "store", experts="int4", progress=False)


@pytest.fixture(scope="module")
def bf16_store(tmp_path_factory, tokenizer):
    return half_store(tmp_path_factory, tokenizer, torch.bfloat16)


def decode_logits(model, prompt: list[int], steps: int, lean: list[bool]) -> torch.Tensor:
    """Greedy decode logits, step i through lean_forward where lean[i] (else the layers' own forward)."""
    layers = model.model.layers
    past = DynamicCache(config=model.config)
    out = []
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt]), cache=past, use_cache=True).logits[0, -1]
        for i in range(steps):
            for layer in layers:
                if lean[i]:
                    layer.forward = types.MethodType(lean_forward, layer)
                elif "forward" in layer.__dict__:
                    del layer.forward
            logits = model(input_ids=torch.tensor([[int(logits.argmax())]]), cache=past, use_cache=True).logits[0, -1]
            out.append(logits.float())
    return torch.stack(out)


def test_fp16_lean_decode_gives_the_modules_bits(tmp_path_factory, tokenizer):
    """The same with float16 weights and activations (the kernels' other half-precision dtype)."""
    store = half_store(tmp_path_factory, tokenizer, torch.float16)
    with moestream.load(store, cache="1GB", context=4, progress=False, prefetch="none") as m:
        assert m.model.dtype == torch.float16
        assert all(hasattr(layer, "_moestream_lean") for layer in m.model.model.layers)
        want = decode_logits(m.model, [5, 17, 42], 6, [False] * 6)
        got = decode_logits(m.model, [5, 17, 42], 6, [True] * 6)
    assert torch.equal(got, want)


def test_layers_it_does_not_know_keep_their_forward(qwen3_store):
    """A float32 store (the plain products, no half-precision matvec kernels): no layer is given the lean forward."""
    with moestream.load(qwen3_store, cache="1GB", progress=False) as m:
        assert not any(hasattr(layer, "_moestream_lean") for layer in m.model.model.layers)


@pytest.mark.parametrize("prompt", [[7], [5, 17, 42, 99, 7, 250, 3, 61]])
def test_lean_decode_gives_the_modules_bits(bf16_store, prompt):
    """Every layer (the two MoE ones and the dense MLP one) takes the lean forward; its logits are those of the
    modules' path bit for bit, with KV buffers smaller than the run (context 4: grown by doubling), a one-token
    prompt (the first step's cache is empty: the modules' forward), and steps through the modules in between
    (their concatenations copied back into buffers)."""
    with moestream.load(bf16_store, cache="1GB", context=4, progress=False, prefetch="none") as m:
        assert all(hasattr(layer, "_moestream_lean") for layer in m.model.model.layers)
        steps = 10
        want = decode_logits(m.model, prompt, steps, [False] * steps)
        got = decode_logits(m.model, prompt, steps, [True] * steps)
        mixed = decode_logits(m.model, prompt, steps, [i % 3 != 1 for i in range(steps)])
    assert torch.equal(got, want)
    assert torch.equal(mixed, want)


def test_lean_decode_guesses_what_the_modules_path_guesses(bf16_store, monkeypatch):
    """With lookahead, the next layer's router logits come out of the attention block's call; the guesses (experts
    and their order) are those the modules' path computes separately, and the logits the same bits."""
    from moestream.cache import ExpertCache

    guesses = []
    real = ExpertCache.prefetch
    monkeypatch.setattr(ExpertCache, "prefetch", lambda self, info, experts, keep: guesses.append(
        (info.layer, list(experts))) or real(self, info, experts, keep))
    with moestream.load(bf16_store, cache="1GB", context=64, progress=False, prefetch="lookahead") as m:
        for mod in m.model.modules():  # the lean path's guesses from a layer's input (test_own_guesses_...,
            if hasattr(mod, "_moestream"):  # test_a_layer_guesses_...) are not the modules'
                mod._moestream.own, mod._moestream.ahead_norm = False, None
        runs = []
        for lean in (False, True):
            guesses.clear()
            logits = decode_logits(m.model, [5, 17, 42], 6, [lean] * 6)
            runs.append((logits, list(guesses)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and len(runs[0][1]) > 6


def test_own_guesses_start_reads_before_the_attention_and_change_nothing(bf16_store, monkeypatch):
    """--prefetch lookahead / auto: each lean MoE layer first guesses its own experts from its input and starts
    reading those the cache lacks (a prefetch keeping nothing: the layer has asked for nothing yet); auto only while
    the layer missed lately (ExpertCache.organic under AUTO_OWN_BELOW). The logits are those without guesses."""
    import moestream.decode as decode
    from moestream.cache import ExpertCache

    calls, own_reads = [], []
    real_guess, real_prefetch = decode.guess_own, ExpertCache.prefetch
    monkeypatch.setattr(decode, "guess_own", lambda src, *a: calls.append(src.info.layer) or real_guess(src, *a))
    monkeypatch.setattr(ExpertCache, "prefetch", lambda self, info, experts, keep: (
        own_reads.append((info.layer, list(experts))) if not keep else None) or real_prefetch(self, info, experts, keep))
    with moestream.load(bf16_store, cache="1GB", context=64, progress=False, prefetch="none") as m:
        want = decode_logits(m.model, [5, 17, 42], 6, [True] * 6)
    assert not calls and not own_reads
    for mode in ("lookahead", "auto"):
        with moestream.load(bf16_store, cache="1GB", context=64, progress=False, prefetch=mode) as m:
            moe = sorted(i.layer for i in m.store.layers)
            calls.clear()
            m.cache.clear()  # nothing cached: the first step's guesses all miss
            got = decode_logits(m.model, [5, 17, 42], 6, [True] * 6)
            assert torch.equal(got, want)
            # the prefill (3 tokens, the modules' path) left each layer's average low: auto guesses every step
            assert calls == moe * 6
            assert {layer for layer, _ in own_reads} == set(moe)
            if mode == "auto":
                calls.clear()
                m.cache.organic = dict.fromkeys(moe, 1.0)  # every recent request held: no guess
                with torch.inference_mode():
                    past = DynamicCache(config=m.model.config)
                    m.model(input_ids=torch.tensor([[5, 17]]), cache=past, use_cache=True)
                    m.cache.organic = dict.fromkeys(moe, 1.0)
                    m.model(input_ids=torch.tensor([[9]]), cache=past, use_cache=True)
                assert calls == []


def test_a_layer_guesses_the_next_ones_first_experts_from_its_input(bf16_store, monkeypatch):
    """Beside its own guess, each lean MoE layer but the last guesses the next MoE layer's first EARLY_NEXT experts
    from its input (the next layer's router and post-attention norm) and starts reading them, keeping its own
    guesses; the results stay those without guesses (test_own_guesses_...)."""
    from moestream.cache import ExpertCache
    from moestream.runtime import EARLY_NEXT

    events = []  # ("guess", router, norm, k, experts) and ("prefetch", layer, experts, keep), in order
    real_guess, real_prefetch = ckernels.router_guess, ExpertCache.prefetch

    def guess(router, norm, x, k):
        got = real_guess(router, norm, x, k)
        events.append(("guess", router.data_ptr(), norm.data_ptr(), k, got))
        return got

    monkeypatch.setattr(ckernels, "router_guess", guess)
    monkeypatch.setattr(ExpertCache, "prefetch", lambda self, info, experts, keep: events.append(
        ("prefetch", info.layer, list(experts), list(keep))) or real_prefetch(self, info, experts, keep))
    with moestream.load(bf16_store, cache="1GB", context=64, progress=False, prefetch="lookahead") as m:
        leans = {layer.mlp.experts._moestream.info.layer: layer._moestream_lean for layer in m.model.model.layers
                 if layer._moestream_lean.router is not None}
        first, last = sorted(leans)
        assert m.model.model.layers[first].mlp.experts._moestream.ahead_norm is leans[last].weights[7]
        assert m.model.model.layers[last].mlp.experts._moestream.ahead_norm is None
        m.cache.clear()
        decode_logits(m.model, [5, 17, 42], 3, [True] * 3)
    early = [i for i, e in enumerate(events) if e[0] == "prefetch" and e[1] == last and e[3]
             and events[i - 1][0] == "guess"]  # not the guesses beside the attention's output (_prefetch_next)
    assert len(early) == 3  # one a step, from the first MoE layer
    next_router = (leans[last].weights[8].data_ptr(), leans[last].weights[7].data_ptr())
    for i in early:
        _, router, norm, k, experts = events[i - 1]
        assert (router, norm, k) == (*next_router, min(EARLY_NEXT, leans[first].router[1]))
        assert events[i][2] == experts
        own = events[i - 2]  # the first layer's own guess, kept
        assert own[:2] == ("prefetch", first) and not own[3] and events[i][3] == [(first, e) for e in own[2]]


def test_lean_decode_keeps_kv_in_place_and_transformers_sees_a_dynamic_cache(bf16_store):
    """After a lean step the cache layer's keys are a view of its buffer holding every position, and the
    cache's length counts the new token."""
    with moestream.load(bf16_store, cache="1GB", context=64, progress=False, prefetch="none") as m:
        past = DynamicCache(config=m.model.config)
        with torch.inference_mode():
            m.model(input_ids=torch.tensor([[5, 17, 42]]), cache=past, use_cache=True)
            m.model(input_ids=torch.tensor([[9]]), cache=past, use_cache=True)
            first = past.layers[0].keys.data_ptr()
            m.model(input_ids=torch.tensor([[11]]), cache=past, use_cache=True)
        layer = past.layers[0]
        assert past.get_seq_length() == 5 and layer.keys.shape[2] == 5
        assert layer.keys.data_ptr() == first == layer._moestream_kv[0].data_ptr()  # written in place
        assert layer._moestream_kv[0].shape[2] == 64


def test_router_logits_asked_for_go_through_the_modules(bf16_store):
    """A forward that asks for router logits gets them (the modules' path records them), lean layers or not."""
    with moestream.load(bf16_store, cache="1GB", context=64, progress=False, prefetch="none") as m:
        past = DynamicCache(config=m.model.config)
        with torch.inference_mode():
            m.model(input_ids=torch.tensor([[5, 17, 42]]), cache=past, use_cache=True)
            out = m.model(input_ids=torch.tensor([[9]]), cache=past, use_cache=True, output_router_logits=True)
        assert out.router_logits is not None and len(out.router_logits) == 2
