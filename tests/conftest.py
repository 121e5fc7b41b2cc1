"""Tiny random checkpoints made with transformers' own classes, saved as users' checkpoints are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moestream.convert import convert
from moestream.demo import build_tokenizer

VOCAB = 320


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(vocab_size=VOCAB, files=3)


def qwen3_model():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    # Layer 1 is a plain MLP layer, so the MoE layers are 0 and 2: layer numbers must survive conversion.
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                            num_hidden_layers=3, mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, num_experts=8, num_experts_per_tok=2, initializer_range=0.2,
                            tie_word_embeddings=False, eos_token_id=0)
    return Qwen3MoeForCausalLM(config).float()


def mixtral_model():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(1)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, initializer_range=0.2, eos_token_id=0)
    return MixtralForCausalLM(config).float()


def save(model, path: Path, tokenizer=None, fused: bool = False) -> Path:
    """save_pretrained writes the upstream per-expert layout; `fused` writes the model's 3-D tensors as they are."""
    if fused:
        path.mkdir(parents=True)
        model.config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    else:
        model.save_pretrained(path, max_shard_size="200KB")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen3_ckpt(tmp_path_factory, tokenizer) -> Path:
    return save(qwen3_model(), tmp_path_factory.mktemp("ckpt") / "qwen3", tokenizer)


@pytest.fixture(scope="session")
def qwen3_fused_ckpt(tmp_path_factory, tokenizer) -> Path:
    return save(qwen3_model(), tmp_path_factory.mktemp("ckpt") / "qwen3-fused", tokenizer, fused=True)


@pytest.fixture(scope="session")
def mixtral_ckpt(tmp_path_factory, tokenizer) -> Path:
    return save(mixtral_model(), tmp_path_factory.mktemp("ckpt") / "mixtral", tokenizer)


@pytest.fixture(scope="session")
def qwen3_store(tmp_path_factory, qwen3_ckpt) -> Path:
    return convert(str(qwen3_ckpt), tmp_path_factory.mktemp("store") / "qwen3", progress=False)


@pytest.fixture(scope="session")
def mixtral_store(tmp_path_factory, mixtral_ckpt) -> Path:
    return convert(str(mixtral_ckpt), tmp_path_factory.mktemp("store") / "mixtral", progress=False)


def expert_bytes(store: Path) -> int:
    meta = json.loads((store / "store.json").read_text())
    return sum(i["experts"] * i["record_bytes"] for i in meta["layers"])
