"""Conversion: every expert tensor bit for bit, atomic output, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moestream.convert as conv
from conftest import VOCAB, save
from moestream.safetensors_io import Checkpoint
from moestream.skeleton import UnsupportedModel
from moestream.store import Store, record_tensors


def records(store_path):
    """{(module, expert): {param: tensor}} read straight from the layer files."""
    s = Store.open(store_path)
    out = {}
    for info in s.layers:
        data = (s.root / info.path).read_bytes()
        for e in range(info.experts):
            buf = torch.frombuffer(bytearray(data[e * info.record_bytes:(e + 1) * info.record_bytes]),
                                   dtype=torch.uint8)
            out[info.module, e] = {k: v.clone() for k, v in record_tensors(buf, info.tensors).items()}
    return s, out


def test_per_expert_layout_bit_for_bit(qwen3_ckpt, qwen3_store):
    s, recs = records(qwen3_store)
    assert [i.layer for i in s.layers] == [0, 2]  # layer 1 is dense MLP
    raw = Checkpoint(qwen3_ckpt)
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in raw.keys()
    for info in s.layers:
        p = info.module.rsplit(".", 1)[0]  # model.layers.N.mlp
        for e in range(info.experts):
            gate, up, down = (raw.get(f"{p}.experts.{e}.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj"))
            assert torch.equal(recs[info.module, e]["gate_up_proj"], torch.cat([gate, up]))
            assert torch.equal(recs[info.module, e]["down_proj"], down)
            assert info.record_bytes % 4096 == 0


def test_mixtral_w1_w3_w2_layout(mixtral_ckpt, mixtral_store):
    s, recs = records(mixtral_store)
    raw = Checkpoint(mixtral_ckpt)
    ref = AutoModelForCausalLM.from_pretrained(mixtral_ckpt, experts_implementation="eager")
    for info in s.layers:
        n = info.layer
        for e in range(info.experts):
            w = {k: raw.get(f"model.layers.{n}.block_sparse_moe.experts.{e}.{k}.weight") for k in ("w1", "w2", "w3")}
            assert torch.equal(recs[info.module, e]["gate_up_proj"], torch.cat([w["w1"], w["w3"]]))
            assert torch.equal(recs[info.module, e]["down_proj"], w["w2"])
            # ...which is exactly what transformers itself loads.
            assert torch.equal(recs[info.module, e]["gate_up_proj"], ref.model.layers[n].mlp.experts.gate_up_proj[e])
    # Router weights went to the dense file under the model's names.
    with safe_open(s.dense_path, "pt") as f:
        assert "model.layers.0.mlp.gate.weight" in f.keys()
        assert not any("experts" in k for k in f.keys())


def test_fused_layout_bit_for_bit(qwen3_fused_ckpt, tmp_path):
    store = conv.convert(str(qwen3_fused_ckpt), tmp_path / "s", progress=False)
    s, recs = records(store)
    raw = Checkpoint(qwen3_fused_ckpt)
    assert "model.layers.0.mlp.experts.gate_up_proj" in raw.keys()
    for info in s.layers:
        gu, down = raw.get(f"{info.module}.gate_up_proj"), raw.get(f"{info.module}.down_proj")
        for e in range(info.experts):
            assert torch.equal(recs[info.module, e]["gate_up_proj"], gu[e])
            assert torch.equal(recs[info.module, e]["down_proj"], down[e])


def test_store_metadata_and_copied_files(qwen3_ckpt, qwen3_store):
    meta = json.loads((qwen3_store / "store.json").read_text())
    assert meta["format_version"] == 1 and meta["model_type"] == "qwen3_moe"
    assert meta["dtype"] == "float32" and meta["checksum"] == "xxh3_64"
    assert set(meta["source"]["files"]) == {p.name for p in qwen3_ckpt.glob("*.safetensors")}
    for layer in meta["layers"]:
        assert len(layer["checksums"]) == layer["experts"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (qwen3_store / name).is_file(), name
    assert not list(qwen3_store.glob("model*.safetensors"))


def test_bf16_kept_in_dtype(tmp_path, tokenizer):
    from conftest import qwen3_model

    ckpt = save(qwen3_model().to(torch.bfloat16), tmp_path / "bf16")
    s = Store.open(conv.convert(str(ckpt), tmp_path / "s", progress=False))
    assert s.meta["dtype"] == "bfloat16"
    assert {t.dtype for t in s.layers[0].tensors} == {"bfloat16"}


def test_interrupted_conversion_leaves_no_store(qwen3_ckpt, tmp_path, monkeypatch):
    calls = []
    real = conv.write_layer

    def fail_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway
        return real(*a, **k)

    monkeypatch.setattr(conv, "write_layer", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(str(qwen3_ckpt), tmp_path / "out", progress=False)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no store, no temporary directory


def test_stale_partial_from_killed_process_is_removed(qwen3_ckpt, tmp_path):
    dead = tmp_path / ".out.partial-999999999"
    (dead / "experts").mkdir(parents=True)
    conv.convert(str(qwen3_ckpt), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_output_is_kept_without_force(qwen3_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        conv.convert(str(qwen3_ckpt), out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    conv.convert(str(qwen3_ckpt), out, force=True, progress=False)
    assert (out / "store.json").is_file() and not (out / "precious.txt").exists()


def test_non_moe_checkpoint_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2))
    m.save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedModel, match="not a Mixture-of-Experts model"):
        conv.convert(str(tmp_path / "llama"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_model_type_is_refused(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "frobnicator", "hidden_size": 8}))
    with pytest.raises(UnsupportedModel, match="frobnicator"):
        conv.convert(str(d), tmp_path / "out", progress=False)


def test_missing_source_is_refused(tmp_path):
    with pytest.raises(UnsupportedModel, match="no such directory"):
        conv.convert(str(tmp_path / "nope"), tmp_path / "out", progress=False)


def test_checkpoint_missing_a_tensor_is_refused(qwen3_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "broken"
    shutil.copytree(qwen3_ckpt, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = d / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModel, match="q_proj"):
        conv.convert(str(d), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_peak_memory_is_about_one_expert_not_the_model(qwen3_ckpt, tmp_path, monkeypatch):
    """The converter never materialises more than one expert's tensors of a layer at a time."""
    seen = []
    real = conv._expert_tensors

    def spy(plan, e, ckpt):
        out = real(plan, e, ckpt)
        seen.append(sum(t.numel() for t in out.values()))
        return out

    monkeypatch.setattr(conv, "_expert_tensors", spy)
    conv.convert(str(qwen3_ckpt), tmp_path / "s", progress=False)
    per_expert = 3 * 64 * 48
    assert seen and max(seen) == per_expert
    assert os.path.isdir(tmp_path / "s")


def test_quantised_checkpoint_is_refused_not_misread(qwen3_ckpt, tmp_path):
    """A config that says FP8 over weights that are not (and an unknown method) is refused, nothing written.
    Real quantised checkpoints are in test_native.py."""
    import shutil

    d = tmp_path / "fp8"
    shutil.copytree(qwen3_ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match=r"says fp8, but no quantised tensor"):
        conv.convert(str(d), tmp_path / "out", progress=False)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match=r"quantised \(gptq\).*mxfp4"):
        conv.convert(str(d), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
