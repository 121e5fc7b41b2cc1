"""Write a transformers Qwen-MoE or DeepSeek-V2/V3 model as a GGUF file, with llama.cpp's tensor names and
metadata (DeepSeek as llama.cpp's converter writes it today: MLA as MQA with `*_mla` lengths, `kv_b_proj`
split into `attn_k_b` (transposed) and `attn_v_b`, the correction bias as `exp_probs_b.bias`).

For the GGUF import's tests (files written here with the `gguf` package, not downloaded) and for
benchmarks that run llama.cpp on the same weights as moestream. Experts in Q4_0, Q8_0, F16 or
F32 (the types gguf-py can quantise); `quantize` may be replaced to write other block types.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ARCH_OF = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2",
           "glm4_moe": "glm4moe", "gpt_oss": "gpt-oss"}


def tensor_names(model) -> dict[str, str]:
    """Model parameter name -> GGUF tensor name; an experts module's gate_up_proj maps to its
    ffn_gate_exps (and holds ffn_up_exps in its second half of rows). Works on a meta model."""
    from transformers.modeling_gguf_pytorch_utils import Qwen2MoeTensorProcessor, get_gguf_hf_weights_map

    arch = ARCH_OF.get(model.config.model_type, model.config.model_type)
    out = {}  # (Qwen2-MoE's processor: the one that places gate_up_proj; its names are shared with DeepSeek)
    for gguf_name, hf in get_gguf_hf_weights_map(model, Qwen2MoeTensorProcessor(), model_type=arch).items():
        if "_exps" in gguf_name:
            gguf_name += ".weight"
            if "ffn_up_exps" in gguf_name:
                continue
        out[hf] = gguf_name
    for hf in model.state_dict():  # llama.cpp names DeepSeek's correction bias e_score_correction.bias
        if hf.endswith("mlp.gate.e_score_correction_bias") and hf not in out:
            out[hf] = f"blk.{hf.split('.')[2]}.exp_probs_b.bias"
    return out


def _mla_metadata(w, c) -> None:
    """DeepSeek-V2/V3 keys, as llama.cpp's DeepseekV2Model.set_gguf_parameters writes them."""
    import gguf

    w.add_head_count_kv(1)  # MLA as MQA
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    w.add_value_length_mla(c.v_head_dim)
    w.add_kv_lora_rank(c.kv_lora_rank)
    if c.q_lora_rank is not None:
        w.add_q_lora_rank(c.q_lora_rank)
    w.add_vocab_size(c.vocab_size)
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_shared_count(c.n_shared_experts or 0)
    w.add_expert_weights_scale(float(c.routed_scaling_factor))
    if c.norm_topk_prob:
        w.add_expert_weights_norm(True)
    sigmoid = c.model_type == "deepseek_v3"
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_expert_group_count(c.n_group or 1)
    w.add_expert_group_used_count(c.topk_group or 1)
    w.add_rope_dimension_count(c.qk_rope_head_dim)


def _tokenizer_metadata(w, tokenizer, vocab_size: int) -> None:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    special = set(tokenizer.all_special_ids)
    types = [3 if i in special else 1 for i in range(len(tokenizer))] + [4] * (vocab_size - len(tokenizer))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges", [])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for attr, add in (("eos_token_id", w.add_eos_token_id), ("bos_token_id", w.add_bos_token_id),
                      ("pad_token_id", w.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(getattr(tokenizer, attr))
    w.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)


def gguf_writer(path: str | Path, config, tokenizer=None, file_type: str = "Q4_0"):
    """A gguf.GGUFWriter for `path` holding llama.cpp's metadata for `config` (and `tokenizer`); add tensors
    with add_tensor (small files) or add_tensor_info + write_tensor_data (streamed, for large ones)."""
    import gguf

    c = config
    arch = ARCH_OF.get(c.model_type)
    if arch is None:
        raise ValueError(f"GGUF export supports {', '.join(ARCH_OF)}, not {c.model_type}")
    w = gguf.GGUFWriter(Path(path), arch)
    w.add_name(getattr(c, "_name_or_path", "") or arch)
    if arch != "glm4moe":
        w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_feed_forward_length(getattr(c, "moe_intermediate_size", None) or c.intermediate_size)
    if arch == "gpt-oss":  # as llama.cpp's GptOssModel.set_gguf_parameters
        import gguf

        w.add_head_count_kv(c.num_key_value_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_expert_count(c.num_local_experts)
        w.add_sliding_window(c.sliding_window)
        rope = c.rope_parameters
        if rope.get("rope_type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif arch == "deepseek2":
        _mla_metadata(w, c)
    elif arch == "glm4moe":  # as llama.cpp's Glm4MoeModel.set_gguf_parameters; one NextN block counted in
        import gguf

        w.add_block_count(c.num_hidden_layers + 1)
        w.add_nextn_predict_layers(1)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_rope_dimension_count(int(c.head_dim * c.rope_parameters.get("partial_rotary_factor", 1.0)))
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_shared_count(c.n_shared_experts)
        w.add_leading_dense_block_count(c.first_k_dense_replace)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(float(c.routed_scaling_factor))
        w.add_expert_weights_norm(bool(c.norm_topk_prob))
    else:
        w.add_head_count_kv(c.num_key_value_heads)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_expert_count(c.num_experts)
        if getattr(c, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
        w.add_expert_weights_norm(bool(getattr(c, "norm_topk_prob", False)))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if file_type == "Q4_0" else gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        _tokenizer_metadata(w, tokenizer, c.vocab_size)
    return w


def _gpt_oss_expert(put, hf: str, t: torch.Tensor, kinds: dict) -> None:
    """GPT-OSS's [in, out] expert parameters with interleaved gate/up columns, as llama.cpp's converter writes
    them: separate gate and up [E, out, in], down [E, out, in], and de-interleaved biases."""
    blk, param = f"blk.{hf.split('.')[2]}", hf.rsplit(".", 1)[1]
    if param == "gate_up_proj":
        put(f"{blk}.ffn_gate_exps.weight", t[..., 0::2].transpose(1, 2), kinds["gate"])
        put(f"{blk}.ffn_up_exps.weight", t[..., 1::2].transpose(1, 2), kinds["up"])
    elif param == "down_proj":
        put(f"{blk}.ffn_down_exps.weight", t.transpose(1, 2), kinds["down"])
    elif param == "gate_up_proj_bias":
        put(f"{blk}.ffn_gate_exps.bias", t[:, 0::2], "F32")
        put(f"{blk}.ffn_up_exps.bias", t[:, 1::2], "F32")
    else:
        put(f"{blk}.ffn_down_exps.bias", t, "F32")


def export_gguf(model, path: str | Path, tokenizer=None, experts: str = "Q4_0", dense: str = "F32",
                quantize: Callable[[np.ndarray, object], np.ndarray] | None = None,
                types: dict[str, str] | None = None) -> Path:
    """Write `model` (Qwen3-MoE, Qwen2-MoE, DeepSeek-V2/V3; real weights) to `path`.

    `experts` / `dense`: the GGUF type of expert matrices and of dense matrices (norms, biases and
    routers stay F32, as llama.cpp keeps them); `types` overrides per expert part ("gate", "up",
    "down"); `quantize(array, type)` makes the blocks (default: gguf-py's quantiser)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    quantize = quantize or gguf.quants.quantize
    path = Path(path)
    w = gguf_writer(path, model.config, tokenizer, experts)

    def put(name: str, t: torch.Tensor, type_name: str) -> None:
        a = np.ascontiguousarray(t.detach().float().numpy())
        if type_name == "F32" or a.ndim == 1:
            w.add_tensor(name, a)
        elif type_name == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            qt = Q[type_name]
            w.add_tensor(name, quantize(a, qt), raw_dtype=qt)

    names = tensor_names(model)
    kinds = {"gate": experts, "up": experts, "down": experts, **(types or {})}
    gpt_oss = model.config.model_type == "gpt_oss"
    for hf, t in model.state_dict().items():
        if gpt_oss and ".mlp.experts." in hf:
            _gpt_oss_expert(put, hf, t, kinds)
            continue
        if hf not in names:
            continue  # tied lm_head
        name = names[hf] + (".weight" if names[hf].endswith("attn_sinks") else "")
        if name.endswith("ffn_gate_exps.weight"):
            ff = t.shape[1] // 2
            put(name, t[:, :ff], kinds["gate"])
            put(name.replace("ffn_gate_exps", "ffn_up_exps"), t[:, ff:], kinds["up"])
        elif name.endswith("ffn_down_exps.weight"):
            put(name, t, kinds["down"])
        elif name.endswith("attn_kv_b.weight"):  # llama.cpp's split for MLA: k_b transposed, v_b as is
            c = model.config
            kv = t.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, -1)
            put(name.replace("attn_kv_b", "attn_k_b"), kv[:, :c.qk_nope_head_dim].transpose(1, 2).contiguous(), dense)
            put(name.replace("attn_kv_b", "attn_v_b"), kv[:, c.qk_nope_head_dim:].contiguous(), dense)
        elif "ffn_gate_inp" in name or t.dim() == 1:
            put(name, t.reshape(-1) if "shexp" in name else t, "F32")
        else:
            put(name, t, dense)
    if model.config.model_type == "glm4_moe":  # llama.cpp keeps the NextN (MTP) block: a reader must skip it
        nextn, hidden = model.config.num_hidden_layers, model.config.hidden_size
        w.add_tensor(f"blk.{nextn}.nextn.eh_proj.weight", np.zeros((hidden, 2 * hidden), dtype=np.float32))
        w.add_tensor(f"blk.{nextn}.nextn.enorm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{nextn}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{nextn}.ffn_down_exps.weight", np.zeros((2, hidden, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
