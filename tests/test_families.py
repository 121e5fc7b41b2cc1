"""More MoE families through the same engine: parity with transformers' eager fp32 model, with evictions.

Each family's tiny checkpoint is made by transformers' own config and model classes and saved with
`save_pretrained`, so the converter reads each family's real on-disk key names and layouts (shared
experts, MLA attention, transposed/interleaved GPT-OSS experts with biases, hybrid linear attention...).
Qwen3-MoE and Mixtral are in test_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, GenerationConfig

import moestream
from moestream.convert import convert
from moestream.skeleton import model_class
from moestream.store import Store

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.2)
MLA = dict(num_key_value_heads=4, moe_intermediate_size=32, intermediate_size=96, n_routed_experts=8,
           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_hidden_layers=3)
HYBRID = dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
              head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
              linear_value_head_dim=16, num_hidden_layers=4, layer_types=None)
FAMILIES = {
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96,
                      num_experts=8, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(MLA, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1),
    "deepseek_v3": dict(MLA, q_lora_rank=24, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=8),
    "glm4_moe": dict(moe_intermediate_size=32, intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2,
                     n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, head_dim=16, n_group=1,
                     topk_group=1),
    "granitemoe": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "minimax_m2": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16),
    "qwen3_next": dict(HYBRID, intermediate_size=96),
    "qwen3_5_moe_text": dict(HYBRID),
    "llama4_text": dict(intermediate_size=32, intermediate_size_mlp=96, num_local_experts=8, num_experts_per_tok=1,
                        head_dim=16, interleave_moe_layer_step=1, attention_chunk_size=8, num_hidden_layers=3),
    "deepseek_v4": dict(num_key_value_heads=1, head_dim=32, q_lora_rank=32, o_lora_rank=32, o_groups=2,
                        index_n_heads=4, index_head_dim=16, index_topk=4, sliding_window=8,
                        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, num_hidden_layers=4,
                        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], hc_mult=2, num_nextn_predict_layers=0,
                        layer_types=["heavily_compressed_attention", "compressed_sparse_attention",
                                     "sliding_attention", "compressed_sparse_attention"]),
}
# Kimi K2.5: a vision-language model around a DeepSeek-V3 text model; streamed text-only (the image-text-to-text
# model, as transformers builds it, generates from text alone)
KIMI_K25 = dict(text_config=dict(COMMON, **FAMILIES["deepseek_v3"], model_type="deepseek_v3"),
                vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   pos_emb_height=4, pos_emb_width=4, pos_emb_time=1))
FAMILIES["kimi_k25"] = {}
# Llama 4 as released: a vision-language checkpoint (`language_model.model.layers...`); moestream builds its
# causal LM (text only), the reference is transformers' vision-language model on the same file
LLAMA4 = dict(text_config=dict(COMMON, **FAMILIES["llama4_text"]),
              vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                                 projector_output_dim=64))
FAMILIES["llama4"] = {}
NESTED = {"kimi_k25": KIMI_K25, "llama4": LLAMA4}
# DeepSeek V4's checkpoints name tensors without the `model.` prefix (`embed.weight`, `layers.0.attn.wq_a.weight`,
# `hc_head_fn`); transformers 5.25's save_pretrained keeps the prefix, so the test writes upstream's names.
V4_NAMES = {"embed_tokens.weight": "embed.weight", "hc_head.hc_base": "hc_head_base", "hc_head.hc_fn": "hc_head_fn",
            "hc_head.hc_scale": "hc_head_scale"}


def on_disk_name(family: str, key: str) -> str:
    """The upstream checkpoint's name for a tensor transformers saved as `key` (transformers 5.25 saves Kimi
    K2.5's text layers as `language_model.model.blocks.N`; the checkpoints say `layers`)."""
    if family == "kimi_k25":
        return key.replace("language_model.model.blocks.", "language_model.model.layers.")
    if family != "deepseek_v4":
        return key
    key = key.removeprefix("model.")
    return V4_NAMES.get(key, key)


def tiny_config(family: str, overrides: dict | None = None):
    if family in NESTED:
        return AutoConfig.for_model(family, **NESTED[family], **(overrides or {}))
    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES.get(family, {}), **(overrides or {})})


def reference_class(family: str, config):
    """transformers' class for the released checkpoint: the vision-language model where it is one."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText if family in NESTED else model_class(config)


def save_tiny(family: str, path, overrides: dict | None = None) -> None:
    """A tiny random `family` model in fp32, saved under the upstream checkpoint's tensor names."""
    torch.manual_seed(0)
    config = tiny_config(family, overrides)
    model = reference_class(family, config).from_config(config).float()
    with torch.no_grad():  # hash routing (DeepSeek V4's first layers) reads a token -> experts table
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                buf.copy_(torch.stack([torch.randperm(config.n_routed_experts)[:buf.shape[1]] for _ in buf]))
    model.save_pretrained(path)
    if family in ("deepseek_v4", "kimi_k25"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        save_file({on_disk_name(family, k): t for k, t in tensors.items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
PROMPT = [5, 17, 42, 99, 7, 250, 3, 61, 128, 9]
NEW = 24


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_parity(family, tmp_path):
    save_tiny(family, tmp_path / "ckpt")
    ref = reference_class(family, tiny_config(family)).from_pretrained(tmp_path / "ckpt", experts_implementation="eager",
                                               dtype=torch.float32).eval()
    store = convert(str(tmp_path / "ckpt"), tmp_path / "store", progress=False)
    budget = Store.open(store).expert_bytes // 4
    gc = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    with moestream.load(store, cache=budget, device="cpu") as m:
        with torch.no_grad():
            want = ref(torch.tensor([PROMPT])).logits
            got = m.model(torch.tensor([PROMPT])).logits
            expected = ref.generate(torch.tensor([PROMPT]), generation_config=gc)[0, len(PROMPT):].tolist()
        assert (want - got).abs().max().item() <= 1e-4
        tokens = list(m.stream_ids(PROMPT, max_new_tokens=NEW, stop_at_eos=False))
        assert len(set(expected)) > 4, "degenerate test model"
        assert tokens == expected
        assert m.stats.decode.misses > 0 and m.stats.decode.evictions > 0
