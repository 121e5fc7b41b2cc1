"""The transformers model as a skeleton on the meta device: structure, names and shapes, no memory.

Both `convert` (to learn where every checkpoint tensor goes) and the runtime (to fill in the
dense weights) start from it, so the store always matches what transformers builds.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


class UnsupportedModel(Exception):
    """A checkpoint moestream cannot stream: unknown architecture, or no routed experts."""


def load_config(path: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        raise UnsupportedModel(f"{path}/config.json: transformers does not know this model type ({e})") from e
    except OSError as e:
        raise UnsupportedModel(f"{path}: no readable config.json ({e})") from e


def quantization(config: PretrainedConfig) -> str | None:
    """The checkpoint's quantisation method from config.json (fp8, mxfp4, compressed-tensors, ...), or None."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    return str(q.get("quant_method") or q.get("format") or "unknown")


QUANTISATIONS = ("fp8", "mxfp4", "compressed-tensors")  # what native.py reads


def check_weights_supported(config: PretrainedConfig, path: str) -> None:
    """Refuse quantisation methods native.py does not read: their scales read as plain weights would be wrong."""
    method = quantization(config)
    if method is not None and method not in QUANTISATIONS:
        raise UnsupportedModel(
            f"{path}: the checkpoint is quantised ({method}); moestream reads bf16, fp16 and fp32 checkpoints and "
            "these formats: fp8 (block-scaled e4m3, fp32 or E8M0 scales; DeepSeek V3/R1/V4, Kimi K2), mxfp4 "
            "(GPT-OSS), fp4 e2m1 experts (DeepSeek V4), compressed-tensors pack-quantized int4 (Kimi K2 Thinking/K2.5)"
        )


def model_class(config: PretrainedConfig):
    """transformers' auto class that builds the generating model: the causal LM, or for a vision-language
    model without one (Kimi K2.5) the image-text-to-text model, which generates from text alone too."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    if config.model_type not in causal:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as vl

        if config.model_type in vl:
            return AutoModelForImageTextToText
    return AutoModelForCausalLM


def meta_model(config: PretrainedConfig, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The generating model for `config` (model_class) on the meta device (no weights allocated)."""
    from .adapters import adapt

    try:
        with torch.device("meta"):
            model = model_class(config).from_config(config, dtype=dtype)
        adapt(model)
        return model
    except ValueError as e:
        raise UnsupportedModel(
            f"model type {config.model_type!r} has no causal language model class in transformers: {e}"
        ) from e


def is_experts_module(module: torch.nn.Module) -> bool:
    """True for modules built with transformers' `@use_experts_implementation` (they carry its layout flags)."""
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "is_concatenated"))


def experts_modules(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """Every routed-experts module by its qualified name; error if there is none."""
    found = {name: m for name, m in model.named_modules() if is_experts_module(m)}
    if not found:
        raise UnsupportedModel(
            f"{type(model).__name__} ({model.config.model_type}) has no routed-experts module: "
            "it is not a Mixture-of-Experts model, or its experts class does not use transformers' "
            "experts interface, so there is nothing to stream"
        )
    return found


def expert_params(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The module's own 3-D per-expert parameters (first dim = number of experts)."""
    return {n: p for n, p in module.named_parameters(recurse=False) if p is not None}


def layer_index(module_name: str) -> int:
    """The decoder layer number inside a module path like `model.layers.12.mlp.experts`."""
    parts = module_name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks") and b.isdigit():
            return int(b)
    raise UnsupportedModel(f"cannot tell the layer number of experts module {module_name!r}")
