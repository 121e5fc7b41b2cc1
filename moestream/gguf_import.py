"""`moestream convert model.gguf`: llama.cpp's GGUF files into a store.

The config and the tokenizer come from the file's metadata through transformers' own GGUF reader,
so the model is transformers' class as for any checkpoint; tensor names are mapped with the table
transformers uses (gguf-py's tensor name map). Dense tensors are dequantised into `dtype`.
Experts keep their bytes:

- Q4_0 and Q8_0 become the store's int4 / int8 group-32 formats with fp16 scales, bit for bit
  (Q4_0 only changes its nibble order): same values, same size, torch-side expansion; MXFP4 (GPT-OSS)
  becomes native.py's fp4 parts the same way;
- F32 / F16 / BF16 stay as they are;
- every other type (K-quants, IQ, Q4_1, Q5_x...) stays in llama.cpp's blocks: K-quants computed by
  kquants.py's compiled kernels, the rest dequantised at use by the `gguf` package (numpy, the
  reference arithmetic): exact, compact on disk, slower to expand (see README).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .convert import int8_dense_specs, int8_dense_tensors, store_directory, write_layer, write_meta
from .quant import GGUF_SUFFIX, int8_linears
from .safetensors_io import write_safetensors
from .skeleton import UnsupportedModel, expert_params, experts_modules, layer_index, meta_model
from .store import DENSE_FILE

# GGUF architecture -> transformers model type (their experts are plain gate/up/down matrices). transformers
# reads the config of the Qwen ones; DeepSeek's is built here from the metadata (deepseek_config), as
# deepseek_v3 (sigmoid gating: V3, R1, Kimi K2) or deepseek_v2 (softmax: V2, V2-Lite).
ARCHS = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "deepseek2": "deepseek_v3 / deepseek_v2",
         "glm4moe": "glm4_moe", "gpt-oss": "gpt_oss"}
BLOCK = re.compile(r"blk\.(\d+)\.")
MLA_SPLIT = re.compile(r"blk\.(\d+)\.attn_(k|v)_b\.weight$")
EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.(weight|bias)$")
IGNORED = ("rope_freqs.weight",)  # llama.cpp's precomputed tables, rebuilt by transformers
FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TRANSCODED = {"Q4_0": "int4_g32", "Q8_0": "int8_g32", "MXFP4": "fp4_e2m1_g32"}


def read_field(reader, key: str):
    """A metadata value as Python (str, number, or list), or None."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError on damaged files
        raise UnsupportedModel(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = read_field(reader, "general.architecture")
    if arch not in ARCHS:
        raise UnsupportedModel(f"{path}: GGUF architecture {arch!r} is not supported yet; supported: "
                               f"{', '.join(sorted(ARCHS))}")
    return reader, arch


def _tensor(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(data))  # a copy: the reader's arrays are read-only views of the file


def stored_matrix(type_name: str, data: np.ndarray) -> dict[str, torch.Tensor]:
    """One expert matrix as a record keeps it (suffix -> tensor), from its GGUF rows.

    `data` is [rows, cols] for float types, [rows, bytes per row] of blocks otherwise."""
    if type_name in FLOATS:
        t = _tensor(data)
        return {"": t.view(torch.bfloat16) if type_name == "BF16" else t}
    rows = data.shape[0]
    if type_name == "Q4_0":  # block: fp16 d, 16 bytes; element j in the low nibble of byte j, j+16 in the high
        b = _tensor(data).view(rows, -1, 18)
        qs = b[..., 2:]
        vals = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # [rows, blocks, 32] in element order
        packed = vals[..., 0::2] | (vals[..., 1::2] << 4)  # the store's order: element 2i low, 2i+1 high
        return {".q": packed.reshape(rows, -1), ".scale": b[..., :2].contiguous().view(torch.float16).view(rows, -1)}
    if type_name == "Q8_0":  # block: fp16 d, 32 int8
        b = _tensor(data).view(rows, -1, 34)
        return {".q": b[..., 2:].contiguous().view(torch.int8).reshape(rows, -1),
                ".scale": b[..., :2].contiguous().view(torch.float16).view(rows, -1)}
    if type_name == "MXFP4":  # block: E8M0 byte, 16 bytes; element j low nibble of byte j, j+16 the high one
        b = _tensor(data).view(rows, -1, 17)
        qs = b[..., 1:]
        vals = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
        return {".fp4": (vals[..., 0::2] | (vals[..., 1::2] << 4)).reshape(rows, -1),
                ".fp4_scale": b[..., 0].contiguous()}
    return {f"{GGUF_SUFFIX}{type_name}": _tensor(data)}


def _interleaved(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows (or elements) of a and b alternating: a0, b0, a1, b1 ... (GPT-OSS's gate/up order)."""
    return np.stack([a, b], axis=1).reshape(-1, *a.shape[1:])


def _transposed_expert_record(parts: dict[str, tuple[str, np.ndarray]], e: int) -> dict[str, torch.Tensor]:
    """Expert e's record for GPT-OSS, whose parameters are [in, out] with gate/up columns interleaved: MXFP4
    rows (each its own blocks) interleaved losslessly and kept as fp4 parts ([out, in], native.py's rule);
    float matrices interleaved and transposed into the parameter's layout; biases interleaved."""
    out: dict[str, torch.Tensor] = {}
    (gt, gate), (ut, up), (dt, down) = parts["gate"], parts["up"], parts["down"]
    for name, type_name, rows in (("gate_up_proj", gt, _interleaved(gate[e], up[e])), ("down_proj", dt, down[e])):
        if type_name == "MXFP4" and (name == "down_proj" or ut == gt):
            out.update({f"{name}{k}": v for k, v in stored_matrix(type_name, rows).items()})
        elif type_name in FLOATS and (name == "down_proj" or ut == gt):
            out[name] = stored_matrix(type_name, rows)[""].T.contiguous()
        else:
            raise UnsupportedModel(f"GPT-OSS experts in {type_name} (gate {gt}, up {ut}): only MXFP4 and float experts "
                                   "are read for this model")
    if "gate_bias" in parts:
        out["gate_up_proj_bias"] = _tensor(_interleaved(parts["gate_bias"][1][e], parts["up_bias"][1][e]))
        out["down_proj_bias"] = _tensor(parts["down_bias"][1][e])
    return out


def _expert_record(parts: dict[str, tuple[str, np.ndarray]], e: int, transposed: bool) -> dict[str, torch.Tensor]:
    """Expert e's record: gate and up rows fused into gate_up_proj (pieces #0/#1 if their types differ)."""
    if transposed:
        return _transposed_expert_record(parts, e)
    out: dict[str, torch.Tensor] = {}
    (gt, gate), (ut, up), (dt, down) = parts["gate"], parts["up"], parts["down"]
    if gt == ut:
        both = np.concatenate([gate[e], up[e]])
        out.update({f"gate_up_proj{k}": v for k, v in stored_matrix(gt, both).items()})
    else:
        out.update({f"gate_up_proj#0{k}": v for k, v in stored_matrix(gt, gate[e]).items()})
        out.update({f"gate_up_proj#1{k}": v for k, v in stored_matrix(ut, up[e]).items()})
    out.update({f"down_proj{k}": v for k, v in stored_matrix(dt, down[e]).items()})
    return out


# Keys transformers' GGUF config reader (5.25) does not map for these architectures; without them a
# model whose sizes differ from the config class's defaults would be built with the wrong shapes.
EXTRA_KEYS = {"moe_intermediate_size": "expert_feed_forward_length",
              "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
              "head_dim": "attention.key_length", "norm_topk_prob": "expert_weights_norm"}


def deepseek_config(reader, path: Path):
    """A DeepSeek-V2/V3 config from llama.cpp's deepseek2 metadata (transformers' GGUF reader has none).

    llama.cpp stores MLA as MQA: `attention.key_length`/`value_length` are the latent sizes and the real
    head sizes are `*_mla` (older files: key_length = qk_nope + qk_rope, value_length = v_head_dim)."""
    from transformers import AutoConfig

    def get(key, default=None):
        v = read_field(reader, f"deepseek2.{key}")
        return default if v is None else v

    rope = int(get("rope.dimension_count"))
    key_len, value_len = get("attention.key_length_mla"), get("attention.value_length_mla")
    if key_len is None:
        key_len, value_len = get("attention.key_length"), get("attention.value_length")
    sigmoid = int(get("expert_gating_func", 1)) == 2
    tokens = read_field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    kwargs = dict(
        vocab_size=int(get("vocab_size", len(tokens) if tokens else 0)), hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")), moe_intermediate_size=int(get("expert_feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=int(get("attention.head_count")),
        num_key_value_heads=int(get("attention.head_count")), n_shared_experts=int(get("expert_shared_count", 0)),
        n_routed_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
        routed_scaling_factor=float(get("expert_weights_scale", 1.0)),
        norm_topk_prob=bool(get("expert_weights_norm", False)), first_k_dense_replace=int(get("leading_dense_block_count", 0)),
        q_lora_rank=get("attention.q_lora_rank"), kv_lora_rank=int(get("attention.kv_lora_rank")),
        qk_rope_head_dim=rope, qk_nope_head_dim=int(key_len) - rope, v_head_dim=int(value_len),
        n_group=int(get("expert_group_count", 1)), topk_group=int(get("expert_group_used_count", 1)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=read_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=read_field(reader, "tokenizer.ggml.eos_token_id"))
    rope_params = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    if get("rope.scaling.type") == "yarn":
        rope_params.update(rope_type="yarn", factor=float(get("rope.scaling.factor")),
                           original_max_position_embeddings=int(get("rope.scaling.original_context_length")),
                           beta_fast=float(get("rope.scaling.yarn_beta_fast", 32.0)),
                           beta_slow=float(get("rope.scaling.yarn_beta_slow", 1.0)), mscale=1.0,
                           mscale_all_dim=float(get("rope.scaling.yarn_log_multiplier", 0.1)) / 0.1)
    if kwargs["q_lora_rank"] is not None:
        kwargs["q_lora_rank"] = int(kwargs["q_lora_rank"])
    if sigmoid:
        return AutoConfig.for_model("deepseek_v3", rope_parameters=rope_params, **kwargs)
    greedy = kwargs["n_group"] <= 1
    return AutoConfig.for_model("deepseek_v2", rope_parameters=rope_params,
                                topk_method="greedy" if greedy else "group_limited_greedy", **kwargs)


def glm4moe_config(reader):
    """A GLM-4.5/4.6 MoE config from llama.cpp's glm4moe metadata. Its block_count includes the NextN (MTP)
    blocks, which transformers' model does not have: they are left out (and their tensors skipped)."""
    from transformers import AutoConfig

    def get(key, default=None):
        v = read_field(reader, f"glm4moe.{key}")
        return default if v is None else v

    names = {t.name for t in reader.tensors}
    head_dim = int(get("attention.key_length"))
    tokens = read_field(reader, "tokenizer.ggml.tokens")
    return AutoConfig.for_model(
        "glm4_moe", vocab_size=len(tokens), hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")), moe_intermediate_size=int(get("expert_feed_forward_length")),
        num_hidden_layers=int(get("block_count")) - int(get("nextn_predict_layers", 0)),
        num_attention_heads=int(get("attention.head_count")), num_key_value_heads=int(get("attention.head_count_kv")),
        head_dim=head_dim, n_routed_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
        n_shared_experts=int(get("expert_shared_count", 0)), first_k_dense_replace=int(get("leading_dense_block_count", 0)),
        routed_scaling_factor=float(get("expert_weights_scale", 1.0)), norm_topk_prob=bool(get("expert_weights_norm", False)),
        n_group=int(get("expert_group_count", 1)), topk_group=int(get("expert_group_used_count", 1)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get("context_length", 4096)), num_nextn_predict_layers=0,
        attention_bias="blk.0.attn_q.bias" in names, use_qk_norm="blk.0.attn_q_norm.weight" in names,
        rope_parameters={"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0)),
                         "partial_rotary_factor": int(get("rope.dimension_count", head_dim)) / head_dim},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=read_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=read_field(reader, "tokenizer.ggml.eos_token_id"))


def gpt_oss_config(reader):
    """A GPT-OSS config from llama.cpp's gpt-oss metadata (transformers 5.25's GGUF reader fails on its YaRN
    keys: it reads a field's first part, the key length, as the value). Sliding and full attention alternate,
    as in every GPT-OSS (and as llama.cpp hard-codes)."""
    from transformers import AutoConfig

    def get(key, default=None):
        v = read_field(reader, f"gpt-oss.{key}")
        return default if v is None else v

    rope = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 150000.0))}
    if get("rope.scaling.type") == "yarn":
        rope.update(rope_type="yarn", factor=float(get("rope.scaling.factor")), beta_fast=32.0, beta_slow=1.0,
                    original_max_position_embeddings=int(get("rope.scaling.original_context_length")), truncate=False)
    names = {t.name for t in reader.tensors}
    return AutoConfig.for_model(
        "gpt_oss", vocab_size=len(read_field(reader, "tokenizer.ggml.tokens")),
        hidden_size=int(get("embedding_length")), intermediate_size=int(get("expert_feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=int(get("attention.head_count")),
        num_key_value_heads=int(get("attention.head_count_kv")), head_dim=int(get("attention.key_length")),
        num_local_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
        sliding_window=int(get("attention.sliding_window", 128)), rope_parameters=rope,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get("context_length", 131072)), tie_word_embeddings="output.weight" not in names,
        bos_token_id=read_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=read_field(reader, "tokenizer.ggml.eos_token_id"))


def gguf_config(path: Path, reader, arch: str):
    """transformers' config from the GGUF metadata (`reader`, of `arch`), completed with the MoE sizes it leaves out."""
    from transformers import AutoConfig

    if arch == "deepseek2":
        return deepseek_config(reader, path)
    if arch == "glm4moe":
        return glm4moe_config(reader)
    if arch == "gpt-oss":
        return gpt_oss_config(reader)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    for attr, key in EXTRA_KEYS.items():
        value = read_field(reader, f"{arch}.{key}")
        if value is not None and hasattr(config, attr):
            setattr(config, attr, bool(value) if attr == "norm_topk_prob" else int(value))
    return config


def kv_b_from_halves(k_b, v_b, config) -> np.ndarray:
    """kv_b_proj [heads * (qk_nope + v), kv_lora] from llama.cpp's k_b [heads, kv_lora, qk_nope] (transposed)
    and v_b [heads, v, kv_lora] (numpy shapes), dequantised."""
    from gguf.quants import dequantize

    heads = config.num_attention_heads
    k = dequantize(k_b.data, k_b.tensor_type).reshape(heads, config.kv_lora_rank, config.qk_nope_head_dim)
    v = dequantize(v_b.data, v_b.tensor_type).reshape(heads, config.v_head_dim, config.kv_lora_rank)
    return np.concatenate([k.transpose(0, 2, 1), v], axis=1).reshape(-1, config.kv_lora_rank)


def gguf_tokenizer(path: Path, arch: str):
    """The tokenizer from the GGUF metadata, through transformers' GGUF tokenizer reader. AutoTokenizer also
    reads the config, which transformers cannot for deepseek2: there the fast tokenizer class is asked
    directly (the tokenizer fields do not depend on the architecture)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cls = AutoTokenizer if arch in ("qwen3moe", "qwen2moe") else PreTrainedTokenizerFast
    return cls.from_pretrained(path.parent, gguf_file=path.name)


def describe_gguf(path: Path) -> dict:
    """What `moestream inspect FILE.gguf` shows, from the metadata and tensor table only."""
    import gguf

    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise UnsupportedModel(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = read_field(reader, "general.architecture")
    experts: dict[str, int] = {}
    dense: dict[str, int] = {}
    layers = set()
    for t in reader.tensors:
        m = EXPERT_TENSOR.match(t.name)
        into = experts if m else dense
        into[t.tensor_type.name] = into.get(t.tensor_type.name, 0) + int(t.n_bytes)
        if m:
            layers.add(int(m.group(1)))
    n = read_field(reader, f"{arch}.expert_count") or 0
    out = {"file": str(path), "architecture": arch, "name": read_field(reader, "general.name"),
           "layers": read_field(reader, f"{arch}.block_count"), "moe_layers": len(layers), "experts": n,
           "top_k": read_field(reader, f"{arch}.expert_used_count"),
           "shared_expert_ff": read_field(reader, f"{arch}.expert_shared_feed_forward_length"),
           "dense_bytes_by_type": dense, "expert_bytes_by_type": experts,
           "bytes_per_expert": sum(experts.values()) // max(1, n * len(layers)),
           "supported": arch in ARCHS,
           "why": ("yes: experts streamed as stored (Q4_0/Q8_0 as int4/int8 g32, exact; other types kept as "
                   "blocks, dequantised at use)") if arch in ARCHS else
                  f"no: GGUF architecture {arch!r} is not supported yet; supported: {', '.join(sorted(ARCHS))}"}
    return out


def convert_gguf(path: Path, out: Path, force: bool = False, progress: bool = True,
                 dtype: torch.dtype | None = None, dense: str | None = None) -> Path:
    """Write the store for GGUF file `path` at `out` (see the module docstring); `dense` = 'int8' stores the
    dense nn.Linear weights int8 per output channel instead of in `dtype` (lossy, opt-in)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_from_byte_shape
    from transformers import GenerationConfig

    from .gguf_export import tensor_names

    path = Path(path).expanduser().absolute()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    reader, arch = _open(path)
    dtype = dtype or torch.bfloat16
    config = gguf_config(path, reader, arch)
    model = meta_model(config, dtype)
    meta_sd = model.state_dict()
    mapping = {g: hf for hf, g in tensor_names(model).items()}
    experts = {layer_index(n): (n, m) for n, m in experts_modules(model).items()}

    entries, expert_parts, types, mla = [], {}, {"dense": set(), "experts": set()}, {}
    for t in reader.tensors:
        type_name = t.tensor_type.name
        if (b := BLOCK.match(t.name)) and int(b.group(1)) >= config.num_hidden_layers:
            continue  # NextN / MTP blocks (GLM): not part of transformers' model
        if m := MLA_SPLIT.match(t.name):  # llama.cpp's k_b / v_b halves of kv_b_proj: joined below
            mla.setdefault(int(m.group(1)), {})[m.group(2)] = t
            types["dense"].add(type_name)
            continue
        if m := EXPERT_TENSOR.match(t.name):
            layer, part = int(m.group(1)), m.group(2)
            if layer not in experts:
                raise UnsupportedModel(f"{path}: {t.name}, but the config makes layer {layer} a dense layer")
            parts = expert_parts.setdefault(layer, {})
            if m.group(3) == "bias":
                parts[f"{part}_bias"] = (type_name, dequantize(t.data, t.tensor_type))
                continue
            if part == "gate_up":  # llama.cpp's fused form: gate rows, then up rows
                half = t.data.shape[1] // 2
                parts["gate"], parts["up"] = (type_name, t.data[:, :half]), (type_name, t.data[:, half:])
            else:
                parts[part] = (type_name, t.data)
            types["experts"].add(type_name)
            continue
        hf = mapping.get(t.name) or mapping.get(t.name.removesuffix(".weight"))  # llama.cpp's attn_sinks.weight
        if hf is None:
            if t.name in IGNORED:
                continue
            raise UnsupportedModel(f"{path}: tensor {t.name} has no place in {type(model).__name__}")
        if hf not in meta_sd:
            raise UnsupportedModel(f"{path}: {t.name} maps to {hf}, which {type(model).__name__} lacks")
        entries.append((hf, lambda t=t: dequantize(t.data, t.tensor_type), int(t.n_bytes)))
        types["dense"].add(type_name)
    for layer, halves in sorted(mla.items()):
        if set(halves) != {"k", "v"}:
            raise UnsupportedModel(f"{path}: layer {layer} has attn_{'/'.join(halves)}_b without its other half")
        entries.append((f"model.layers.{layer}.self_attn.kv_b_proj.weight",
                        lambda h=halves: kv_b_from_halves(h["k"], h["v"], config),
                        int(halves["k"].n_bytes) + int(halves["v"].n_bytes)))
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    expert_names = {f"{n}.{p}" for n, m in experts.values() for p in expert_params(m)}
    missing = [k for k in meta_sd if k not in {h for h, *_ in entries} and k not in tied and k not in expert_names]
    if missing:
        raise UnsupportedModel(f"{path}: the file lacks {len(missing)} tensor(s) that {type(model).__name__} needs, "
                               f"e.g. {', '.join(missing[:5])}")
    for layer, (name, module) in experts.items():
        parts = expert_parts.get(layer, {})
        if not {"gate", "up", "down"} <= set(parts):
            raise UnsupportedModel(f"{path}: layer {layer} lacks some of ffn_gate_exps, ffn_up_exps, ffn_down_exps")
        want = {k: tuple(v.shape) for k, v in expert_params(module).items()}
        if module.has_bias and not {"gate_bias", "up_bias", "down_bias"} <= set(parts):
            raise UnsupportedModel(f"{path}: layer {layer} lacks the expert biases (ffn_*_exps.bias) the model has")
        n, rows, cols = want["gate_up_proj"]
        down = want["down_proj"]
        if module.is_transposed:  # parameters are [in, out]; GGUF matrices [out, in]
            rows, cols, down = cols, rows, (down[0], down[2], down[1])
        for part, shape in (("gate", (n, rows // 2, cols)), ("up", (n, rows // 2, cols)), ("down", down)):
            type_name, data = parts[part]
            got = tuple(data.shape) if type_name in FLOATS else tuple(quant_shape_from_byte_shape(
                data.shape, GGMLQuantizationType[type_name]))
            if got != shape:
                raise UnsupportedModel(f"{path}: blk.{layer}.ffn_{part}_exps is {got} (experts, rows, cols), the "
                                       f"config makes it {shape}")

    t0 = time.time()
    total = sum(int(t.n_bytes) for t in reader.tensors)
    with store_directory(out, force) as tmp, tqdm(total=total, unit="B", unit_scale=True,
                                                  desc=f"convert {out.name}", disable=not progress) as bar:
        int8 = {f"{n}.weight" for n in int8_linears(model)} if dense == "int8" else set()
        specs = int8_dense_specs([(hf, dtype, tuple(meta_sd[hf].shape)) for hf, *_ in entries], int8)

        def dense_tensors():
            for hf, fetch, nbytes in entries:
                w = _tensor(fetch()).reshape(meta_sd[hf].shape)
                bar.update(nbytes)
                yield hf, w.to(dtype)

        dense_bytes = write_safetensors(tmp / DENSE_FILE, specs, int8_dense_tensors(dense_tensors(), int8),
                                        {"format": "pt", "producer": f"moestream {__version__}"})
        layers = []
        for layer in sorted(experts):
            name, module = experts[layer]
            parts = expert_parts[layer]
            n = parts["gate"][1].shape[0]
            layers.append(write_layer(tmp / "experts" / f"layer-{layer:03d}.bin", layer, name, n,
                                      lambda e, p=parts, m=module: _expert_record(p, e, m.is_transposed), bar))
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        try:
            gguf_tokenizer(path, arch).save_pretrained(tmp)
        except Exception as e:  # a store without a tokenizer still runs on token ids
            print(f"note: {path.name}: no tokenizer from the GGUF metadata ({type(e).__name__}: {e})", file=sys.stderr)
        experts_format = "gguf " + ",".join(sorted(types["experts"]))
        # dense types `dtype` does not hold exactly (F16 in bfloat16: 7 mantissa bits for 10; block types
        # dequantise exactly only in float32)
        exact = {"F32": (torch.float32,), "F16": (torch.float16, torch.float32), "BF16": (torch.bfloat16, torch.float32)}
        rounded = sorted(t for t in types["dense"] if dtype not in exact.get(t, (torch.float32,)))
        transcoded = sorted({f"{k}->{v}" for k, v in TRANSCODED.items() if k in types["experts"]})
        write_meta(tmp, source={"model": str(path), "path": str(path), "revision": None,
                                "files": {path.name: path.stat().st_size}, "gguf_architecture": arch},
                   config=config, model=model, dtype=dtype,
                   quant={"experts": experts_format, "experts_transcoded": transcoded,
                          "dense": "int8_channel" if int8 else "none", "lossy": bool(int8 or rounded),
                          "dense_source": f"gguf {','.join(sorted(types['dense']))} -> "
                                          f"{'int8' if int8 else str(dtype).removeprefix('torch.')}" + (
                                              f" (LOSSY: {','.join(rounded)} rounded; --dtype float32 keeps "
                                              "them exact)" if rounded and not int8 else "")},
                   dense_bytes=dense_bytes, dense_tensors=len(specs), layers=layers, seconds=time.time() - t0)
    return out
