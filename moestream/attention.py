"""Decode attention on CPU: one query against the KV cache in a C kernel, everything else torch's sdpa.

torch's CPU sdpa spends ~0.3 ms per layer on one query over ~90 cached tokens here (1.7 ms over 500), for a
few microseconds of arithmetic: ~8 ms of a ~90 ms resident decode token on bench_decode's model.
`ckernels.attend_one` computes the same float32 sums in 0.05 / 0.22 ms. It is registered with transformers'
AttentionInterface as "moestream_sdpa" (with sdpa's masks): one query per row, unmasked or under a boolean
mask (a batch's padding), goes to the C kernel, so a request decodes the same bits alone and in a batch;
every other call goes to transformers' own sdpa function unchanged.
"""

from __future__ import annotations

import inspect
import sys

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from . import ckernels

NAME = "moestream_sdpa"


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [b, hq, q, dk], key / value [b, hkv, kv, d]."""
    plain = (dropout == 0.0 and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
             and kwargs.get("s_aux") is None and kwargs.get("sinks") is None)
    if plain and query.shape[2] == 1:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = ckernels.attend_one(query, key, value, scale, attention_mask)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(NAME, attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_fast_attention(model: PreTrainedModel) -> bool:
    """Switch a CPU model from sdpa to `attention_forward`; True if switched. Only where the C kernels run and
    the model uses sdpa through AttentionInterface without asking elsewhere whether its attention is "sdpa"
    (a few models build their masks differently when it is)."""
    if not ckernels.available() or model.config._attn_implementation != "sdpa":
        return False
    try:
        source = inspect.getsource(sys.modules[type(model).__module__])
    except (OSError, TypeError):  # no source to check: leave it as it is
        return False
    if '_attn_implementation == "sdpa"' in source or '_attn_implementation != "sdpa"' in source:
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
