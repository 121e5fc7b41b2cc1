"""GGUF import: files written here with the gguf package, compared with their dequantised weights."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

import moestream
from moestream.cli import main
from moestream.convert import convert
from moestream.gguf_export import tensor_names, export_gguf
from moestream.quant import expand
from moestream.skeleton import UnsupportedModel
from moestream.store import Store, record_tensors

VOCAB = 320
PROMPT = [5, 17, 101, 33, 250, 7, 64, 12]


def qwen3(hidden: int = 64, ff: int = 64):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=96, moe_intermediate_size=ff,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, initializer_range=0.2,
                            tie_word_embeddings=False, eos_token_id=0)
    return Qwen3MoeForCausalLM(config).float().eval()


def qwen2():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(1)
    config = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=64,
                            shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, initializer_range=0.2,
                            tie_word_embeddings=True, eos_token_id=0)
    return Qwen2MoeForCausalLM(config).float().eval()


def deepseek(version: int = 3):
    """DeepSeek-V3 (sigmoid routing with correction bias, groups, q LoRA) or V2 (softmax, greedy, no q LoRA)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(2)
    mla = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
               n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=16, initializer_range=0.2, tie_word_embeddings=False, eos_token_id=0)
    if version == 3:
        config = AutoConfig.for_model("deepseek_v3", **mla, q_lora_rank=24, n_group=2, topk_group=1,
                                      routed_scaling_factor=2.5, norm_topk_prob=True)
    else:
        config = AutoConfig.for_model("deepseek_v2", **mla, q_lora_rank=None, topk_method="greedy", n_group=1,
                                      topk_group=1)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # a correction bias that changes the routing
        for name, p in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def glm4moe():
    """GLM-4.5 MoE: partial rotary, attention biases, q/k norms, shared expert, dense first layer, sigmoid router."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(3)
    config = AutoConfig.for_model("glm4_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                  moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                                  n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.5,
                                  attention_bias=True, use_qk_norm=True, initializer_range=0.2,
                                  tie_word_embeddings=False, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn_like(p) * 0.5)
        for name, p in model.named_parameters():  # biases and norms that are not zeros and ones
            if name.endswith("bias") or "norm" in name:
                p.copy_(p + torch.randn_like(p) * 0.1)
    return model


def gpt_oss():
    """GPT-OSS: [in, out] experts with interleaved gate/up columns and biases, sinks, sliding/full layers, YaRN."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(4)
    config = AutoConfig.for_model("gpt_oss", vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
                                  initializer_range=0.2, tie_word_embeddings=False, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # biases and sinks that are not zeros
            if name.endswith(("bias", "sinks")):
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def random_blocks(a: np.ndarray, qtype: Q) -> np.ndarray:
    """Valid blocks of a K-quant gguf-py cannot quantise into: random bits, sane fp16 super-block scales.
    The file's dequantised values, not the model's, are then the reference."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(a.size)
    b = rng.integers(0, 256, size=(*a.shape[:-1], a.shape[-1] // block, size), dtype=np.uint8)
    scale = lambda lo, hi: rng.uniform(lo, hi, size=b.shape[:-1]).astype(np.float16).view(np.uint8).reshape(
        *b.shape[:-1], 2)  # noqa: E731
    if qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin, 12 bytes of 6-bit scales/mins, (Q5_K: 32 bytes of 5th bits,) nibbles
        b[..., 0:2], b[..., 2:4] = scale(0.0005, 0.002), scale(0.0, 0.01)
    elif qtype == Q.Q6_K:  # 128 low bits, 64 high bits, 16 int8 scales, then d
        b[..., 208:210] = scale(0.0002, 0.001)
    else:
        raise ValueError(qtype)
    return b.reshape(*a.shape[:-1], -1)


def quantize_any(a: np.ndarray, qtype: Q) -> np.ndarray:
    return random_blocks(a, qtype) if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else gguf.quants.quantize(a, qtype)


def reference(model, path):
    """`model` with every weight replaced by the file's values through gguf-py's dequantiser."""
    values = {t.name: dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    sd = model.state_dict()
    if model.config.model_type == "gpt_oss":  # [in, out], gate/up interleaved; biases de-interleaved in the file
        for hf in [k for k in sd if ".mlp.experts." in k]:
            blk, param = f"blk.{hf.split('.')[2]}", hf.rsplit(".", 1)[1]
            if param == "gate_up_proj":  # rows of gate and up alternate, then [E, out, in] -> [E, in, out]
                g, u = values[f"{blk}.ffn_gate_exps.weight"], values[f"{blk}.ffn_up_exps.weight"]
                v = np.swapaxes(np.stack([g, u], axis=2).reshape(g.shape[0], -1, g.shape[2]), 1, 2)
            elif param == "gate_up_proj_bias":
                g, u = values[f"{blk}.ffn_gate_exps.bias"], values[f"{blk}.ffn_up_exps.bias"]
                v = np.stack([g, u], axis=2).reshape(g.shape[0], -1)
            elif param == "down_proj":
                v = np.swapaxes(values[f"{blk}.ffn_down_exps.weight"], 1, 2)
            else:
                v = values[f"{blk}.ffn_down_exps.bias"]
            sd[hf] = torch.from_numpy(np.array(v)).reshape(sd[hf].shape)
    for hf, name in tensor_names(model).items():
        if model.config.model_type == "gpt_oss" and ".mlp.experts." in hf:
            continue  # above
        if name.endswith("ffn_gate_exps.weight"):
            v = np.concatenate([values[name], values[name.replace("gate_exps", "up_exps")]], axis=1)
        elif name not in values and name + ".weight" in values:  # GPT-OSS's attn_sinks.weight
            v = values[name + ".weight"]
        elif name not in values:  # DeepSeek's kv_b_proj, written as its k_b/v_b halves: F32, the model's own
            continue
        else:
            v = values[name]
        sd[hf] = torch.from_numpy(np.array(v)).reshape(sd[hf].shape)
    model.load_state_dict(sd)
    return model


@pytest.fixture(scope="module")
def tok():
    from moestream.demo import build_tokenizer

    return build_tokenizer(vocab_size=VOCAB, files=3)


CASES = {
    "Q4_0": (qwen3, {"experts": "Q4_0"}),
    "Q8_0": (qwen3, {"experts": "Q8_0", "dense": "Q8_0"}),
    "Q4_K_M-like": (lambda: qwen3(hidden=256, ff=256),
                    {"experts": "Q4_K", "types": {"down": "Q6_K"}, "quantize": quantize_any}),
    "Q5_K_M-like": (lambda: qwen3(hidden=256, ff=256),
                    {"experts": "Q5_K", "types": {"down": "Q6_K"}, "quantize": quantize_any}),
    "mixed-gate-up": (lambda: qwen3(hidden=256, ff=256),
                      {"experts": "Q4_K", "types": {"up": "Q8_0", "down": "F16"}, "quantize": quantize_any}),
    "qwen2moe-Q4_0": (qwen2, {"experts": "Q4_0"}),
    "deepseek2-v3-Q4_0": (deepseek, {"experts": "Q4_0"}),
    "deepseek2-v2-Q8_0": (lambda: deepseek(2), {"experts": "Q8_0"}),
    "glm4moe-Q4_0": (glm4moe, {"experts": "Q4_0"}),
    "gpt-oss-MXFP4": (gpt_oss, {"experts": "MXFP4"}),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, tok):
    make, kwargs = CASES[request.param]
    d = tmp_path_factory.mktemp("gguf")
    path = export_gguf(make(), d / "model.gguf", tok, **kwargs)
    store = convert(str(path), d / "store", dtype=torch.float32, progress=False)
    return request.param, path, store, reference(make(), path)


def test_streamed_logits_equal_the_dequantised_weights(case):
    name, path, store, ref = case
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits
    record = Store.open(store).layers[0].record_bytes
    with moestream.load(store, cache=3 * record, progress=False) as m:  # 3 of 16 records: evictions
        with torch.no_grad():
            got = m.model(torch.tensor([PROMPT])).logits
        assert m.cache.total().evictions > 0
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        greedy = ref.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert list(m.stream_ids(PROMPT, 12, stop_at_eos=False)) == greedy[0, len(PROMPT):].tolist()


def test_expert_bytes_are_the_files_own(case):
    """Q4_0/Q8_0 become int4/int8 g32 bit for bit; other types keep their blocks; records hold no more."""
    name, path, store, ref = case
    s = Store.open(store)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    info = s.layers[0]
    native = sum(int(tensors[f"blk.{info.layer}.ffn_{p}_exps.weight"].n_bytes) for p in ("gate", "up", "down"))
    assert info.record_bytes * info.experts <= native + info.experts * 4096 + 64 * 4 * info.experts
    buf = torch.from_numpy(np.fromfile(store / info.path, dtype=np.uint8, count=info.record_bytes, offset=0))
    transposed = name.startswith("gpt-oss")  # [in, out] parameters, gate/up columns interleaved
    w = expand(record_tensors(buf, info.tensors), torch.float32, transposed=transposed)
    gate = dequantize(tensors[f"blk.{info.layer}.ffn_gate_exps.weight"].data, tensors[
        f"blk.{info.layer}.ffn_gate_exps.weight"].tensor_type)[0]
    down = dequantize(tensors[f"blk.{info.layer}.ffn_down_exps.weight"].data, tensors[
        f"blk.{info.layer}.ffn_down_exps.weight"].tensor_type)[0]
    gate_up, got_down = (w["gate_up_proj"].T[0::2], w["down_proj"].T) if transposed else (
        w["gate_up_proj"][: gate.shape[0]], w["down_proj"])
    assert torch.equal(gate_up, torch.from_numpy(np.array(gate)))
    assert torch.equal(got_down, torch.from_numpy(np.array(down)))
    meta = json.loads((store / "store.json").read_text())
    assert meta["quant"]["experts"].startswith("gguf ")
    if name == "Q4_0":
        assert meta["quant"]["experts_transcoded"] == ["Q4_0->int4_g32"]
        assert {t.name for t in info.tensors} == {"gate_up_proj.q", "gate_up_proj.scale", "down_proj.q",
                                                  "down_proj.scale"}
    if name.startswith("gpt-oss"):  # MXFP4 kept as fp4 parts (nibble order changed only)
        assert {t.name for t in info.tensors} == {"gate_up_proj.fp4", "gate_up_proj.fp4_scale", "down_proj.fp4",
                                                  "down_proj.fp4_scale", "gate_up_proj_bias", "down_proj_bias"}
    if name == "mixed-gate-up":
        assert {t.name for t in info.tensors} >= {"gate_up_proj#0.gguf_Q4_K", "gate_up_proj#1.q", "down_proj"}


def test_tokenizer_comes_from_the_gguf_metadata(case, tok):
    """Same vocabulary and decoding; splitting text follows transformers' converter for the architecture
    (Qwen2's pre-tokenizer regex), which this test tokenizer does not use, so ids may split differently."""
    name, path, store, ref = case
    from transformers import AutoTokenizer

    got = AutoTokenizer.from_pretrained(store)
    assert {k: v for k, v in got.get_vocab().items() if v < len(tok)} == tok.get_vocab()
    text = "def parse(path):\n    return open(path).read()  # done"
    ids = tok(text)["input_ids"]
    assert got.decode(ids) == tok.decode(ids) == text
    assert got.decode(got(text)["input_ids"]) == text
    assert got.eos_token_id == tok.eos_token_id


def test_cli_convert_and_run_a_gguf_file(tmp_path, tok, capsys, monkeypatch):
    monkeypatch.setenv("MOESTREAM_HOME", str(tmp_path / "home"))
    path = export_gguf(qwen3(), tmp_path / "m.gguf", tok, experts="Q8_0")
    assert main(["convert", str(path), str(tmp_path / "store")]) == 0
    assert main(["run", str(path), "--raw", "-p", "def f(", "-n", "4", "--cache", "1MB"]) == 0
    err = capsys.readouterr().err
    assert "experts format       gguf Q8_0" in err
    assert main(["inspect", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out  # the default bfloat16 cannot hold the file's F32 dense weights exactly
    assert "gguf Q8_0 (as quantised in the GGUF file)" in out
    assert "dense source  gguf F32 -> bfloat16 (LOSSY: F32 rounded; --dtype float32 keeps them exact)" in out
    assert main(["inspect", str(path)]) == 0  # the file itself: metadata and tensor table only
    out = capsys.readouterr().out
    assert "2 MoE layers x 8 experts, top-2" in out and "Q8_0" in out and "supported     yes" in out


def test_gguf_dense_int8(tmp_path, tok):
    """--dense int8 on a GGUF import: dense nn.Linear weights int8 per channel, labelled, close to the exact import."""
    from moestream.quant import Int8Linear

    path = export_gguf(qwen3(), tmp_path / "m.gguf", tok, experts="Q4_0")
    exact = convert(str(path), tmp_path / "exact", dtype=torch.float32, progress=False)
    small = convert(str(path), tmp_path / "int8", dtype=torch.float32, dense="int8", progress=False)
    meta, exact_meta = (json.loads((p / "store.json").read_text())["quant"] for p in (small, exact))
    assert meta["dense"] == "int8_channel" and meta["lossy"]
    assert exact_meta["dense"] == "none" and not exact_meta["lossy"] and "LOSSY" not in exact_meta["dense_source"]
    assert Store.open(small).dense_bytes < 0.6 * Store.open(exact).dense_bytes  # the fp32 embedding stays
    ids = torch.tensor([PROMPT])
    with moestream.load(exact, cache="1MB", progress=False) as a, moestream.load(small, cache="1MB", progress=False) as b:
        assert any(isinstance(mod, Int8Linear) for mod in b.model.modules())
        with torch.no_grad():
            pa, pb = a.model(ids).logits.log_softmax(-1), b.model(ids).logits.log_softmax(-1)
        kl = (pa.exp() * (pa - pb)).sum(-1).mean().item()
        assert 0 < kl < 0.01
        list(b.stream_ids(PROMPT, 3))
        assert "dense format         int8_channel (LOSSY" in b.stats.format()
        list(a.stream_ids(PROMPT, 3))
        assert "dense format" not in a.stats.format()


def test_bad_gguf_files_get_clear_errors_and_leave_out_alone(tmp_path, tok):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UnsupportedModel, match="junk.gguf"):
        convert(str(junk), out, force=True, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        convert(str(tmp_path / "missing.gguf"), tmp_path / "o2", progress=False)
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match="'llama' is not supported yet; supported: deepseek2, glm4moe, gpt-oss, qwen2moe, qwen3moe"):
        convert(str(tmp_path / "llama.gguf"), out, force=True, progress=False)
    assert main(["inspect", str(tmp_path / "llama.gguf"), "--json"]) == 0
    assert (out / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.partial-*"))
    shutil.rmtree(out)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquant_kernels_equal_gguf_py(qtype, monkeypatch):
    """The torch K-quant dequantiser gives gguf-py's values bit for bit; the row-wise kernels (C for Q4_K where
    they build, compiled otherwise) and the joined gate/up pieces compute F.linear on them, for 1, 3, 20 and 40
    tokens (40 expanded whole, and 7 rows at a time)."""
    from moestream import ckernels, kernels, kquants
    from moestream.kernels import KQuantWeight, joined

    blocks = random_blocks(np.zeros((48, 512), dtype=np.float32), Q[qtype])
    want = torch.from_numpy(dequantize(blocks, Q[qtype]))
    t = torch.from_numpy(blocks)
    assert torch.equal(kquants.dequantize(t, qtype), want)
    w = KQuantWeight(t, qtype)
    assert ckernels.takes_kquant(w) == ckernels.available()
    for tokens in (1, 3, 20, 40):
        x = torch.randn(tokens, 512)
        torch.testing.assert_close(w.linear(x), x @ want.T, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(kernels, "EXPAND_BYTES", 7 * 512 * 4)
    torch.testing.assert_close(w.linear(x), x @ want.T, rtol=1e-5, atol=1e-4)
    x = torch.randn(2, 512)
    torch.testing.assert_close(joined([w, w]).linear(x), torch.cat([x @ want.T] * 2, dim=1), rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(ckernels, "_lib", None)  # the compiled torch kernels
    monkeypatch.setattr(ckernels, "_tried", True)
    torch.testing.assert_close(w.linear(x), x @ want.T, rtol=1e-5, atol=1e-4)
