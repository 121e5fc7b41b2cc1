"""One-token decode through whole decoder layers, calling the C kernels directly.

A resident decode token of bench_decode's model spent ~19 of its ~80 ms around the C kernels, not in them: module
calls, kwargs decorators, views and transposes, the rotary embedding as eight torch ops, one_token_linear's casts
(~770 us a layer, benchmarks/RESULTS.md). `use_lean_decode` gives each decoder layer whose make-up it knows a
forward that, for one token on the CPU, runs the same arithmetic with the same roundings (every intermediate
rounded to the model's dtype where transformers rounds it): the attention block in one C call
(ckernels_attention_block: its keys and values written in place into buffers the cache layer's tensors view; the
post-attention norm, the router's logits and, while guessing, the next layer's come out of the same call), then
softmax and top-k in torch (torch.topk's choice among equal logits is kept) and runtime.experts_forward directly.
Any other input (prefill, a batch, a mask, router logits asked for, a cache layer other than DynamicLayer) goes to
the layer's own forward.

Known: Qwen3-MoE's decoder layer (attention with per-head q/k RMSNorm and rotate-half rotary; a top-k softmax
router over moestream's experts, or a dense SiLU MLP).
"""

from __future__ import annotations

import ctypes
import types
from dataclasses import dataclass

import torch

from . import ckernels
from .attention import NAME as FAST_ATTENTION
from .kernels import MatvecLinear, _c_rms_norm, one_token_linear
from .runtime import experts_forward, guess_own, guessing

LAYERS = ("Qwen3MoeDecoderLayer",)  # decoder layer classes whose forward lean_forward reproduces
ATTENTION = ("Qwen3MoeAttention",)
SPARSE_BLOCKS = ("Qwen3MoeSparseMoeBlock",)
ROUTERS = ("Qwen3MoeTopKRouter",)
DENSE_MLPS = ("Qwen3MoeMLP",)


@dataclass
class LeanLayer:
    """What lean_forward reads from one decoder layer, gathered once."""

    weights: list[torch.Tensor]  # input norm, q, k, v, o, q-norm, k-norm, post norm[, router]: kept alive
    pointers: ctypes.Array  # their addresses (the router's None in a dense layer), as ckernels_attention_block reads
    eps: ctypes.Array  # input norm, q-norm, k-norm, post norm
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    layer_idx: int
    context: int  # positions the KV buffers hold (load's --context), grown by doubling past it
    router: tuple[int, int, bool] | None  # experts, top k, normalise the top k: a sparse block
    experts: torch.nn.Module | None  # its forward is runtime.experts_forward
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # gate, up, down: a dense SiLU MLP


def _norm(m: torch.nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an RMSNorm that kernels.use_c_norms gave the C kernel; None for any other."""
    f = getattr(m, "forward", None)
    if getattr(f, "__func__", None) is not _c_rms_norm:
        return None
    return m.weight, float(m.variance_epsilon)


def _plain(*linears: torch.nn.Module) -> bool:
    return all(isinstance(m, MatvecLinear) and m.bias is None and m.weight.is_contiguous() for m in linears)


def plan_layer(layer: torch.nn.Module, config, context: int) -> LeanLayer | None:
    """The LeanLayer of `layer`, or None where lean_forward would not compute exactly what its forward does."""
    if type(layer).__name__ not in LAYERS or config._attn_implementation != FAST_ATTENTION:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    n1, n2 = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
    if type(attn).__name__ not in ATTENTION or n1 is None or n2 is None:
        return None
    qn, kn = _norm(attn.q_norm), _norm(attn.k_norm)
    if (qn is None or kn is None or not _plain(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
            or getattr(attn, "sliding_window", None) is not None):
        return None
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = attn.head_dim
    if (attn.q_proj.weight.shape[0] != heads * head_dim or attn.k_proj.weight.shape[0] != kv_heads * head_dim
            or attn.v_proj.weight.shape[0] != kv_heads * head_dim):
        return None
    router = experts = dense = None
    if type(mlp).__name__ in SPARSE_BLOCKS:
        gate, experts = mlp.gate, mlp.experts
        src = getattr(experts, "_moestream", None)
        if (type(gate).__name__ not in ROUTERS or src is None or src.layout is None
                or not isinstance(getattr(gate, "weight", None), torch.Tensor)):
            return None
        router = (gate.weight.shape[0], gate.top_k, bool(gate.norm_topk_prob))
    elif type(mlp).__name__ in DENSE_MLPS and _plain(mlp.gate_proj, mlp.up_proj, mlp.down_proj) and (
            type(mlp.act_fn).__name__ in ("SiLUActivation", "SiLU")):
        dense = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    else:
        return None
    weights = [n1[0], attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight, qn[0], kn[0],
               n2[0], *([mlp.gate.weight] if router else [])]
    weights = [torch.Tensor.as_subclass(w, torch.Tensor) for w in weights]  # a MatvecWeight router: a plain view
    if (len({w.dtype for w in [*weights, *(dense or ())]}) != 1
            or weights[0].dtype not in (torch.bfloat16, torch.float16) or not all(w.is_contiguous() for w in weights)):
        return None
    return LeanLayer(weights, (ctypes.c_void_p * 9)(*[w.data_ptr() for w in weights], *([] if router else [None])),
                     (ctypes.c_float * 4)(n1[1], qn[1], kn[1], n2[1]), heads, kv_heads, head_dim,
                     float(attn.scaling), attn.layer_idx, context, router, experts, dense)


def _kv_buffers(layer, lean: LeanLayer, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers [1, kv heads, capacity, head dim] for the cache layer's keys and values, holding its `positions`
    with room for one more: transformers' DynamicLayer concatenates a new tensor each token (every position
    copied again: O(context) a token and layer); these take the new position in place. The layer's keys and
    values are views of them, so transformers' own steps (prefill, a fallback) still see a DynamicLayer; after
    such a step, whose concatenation made new tensors, they are copied into buffers again."""
    kv = getattr(layer, "_moestream_kv", None)
    if kv is None or layer.keys.data_ptr() != kv[0].data_ptr() or positions + 1 > kv[0].shape[2]:
        room = lean.context if positions < lean.context else 2 * (positions + 1)
        kv = tuple(t.new_empty(1, lean.kv_heads, room, lean.head_dim) for t in (layer.keys, layer.values))
        kv[0][:, :, :positions] = layer.keys
        kv[1][:, :, :positions] = layer.values
        layer._moestream_kv = kv
    return kv


def lean_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cache=None, use_cache: bool | None = False,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
    """The decoder layer's forward: one CPU token in the kernels (see the module docstring), anything else in
    the layer's own forward."""
    lean: LeanLayer = self._moestream_lean
    cos, sin = position_embeddings if position_embeddings is not None else (None, None)
    layers = getattr(cache, "layers", ())
    layer = layers[lean.layer_idx] if lean.layer_idx < len(layers) else None
    if (hidden_states.shape[:-1] != (1, 1) or hidden_states.device.type != "cpu" or attention_mask is not None
            or hidden_states.dtype != lean.weights[0].dtype
            or any(v is not None and v is not False for v in kwargs.values())  # e.g. router logits asked for
            or type(layer).__name__ != "DynamicLayer" or not layer.is_initialized or layer.keys.shape[0] != 1
            or layer.keys.dtype != hidden_states.dtype
            or cos is None or cos.numel() != lean.head_dim or cos.dtype != hidden_states.dtype):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                  **kwargs)
    positions = layer.keys.shape[2]
    keys, values = _kv_buffers(layer, lean, positions)
    x = hidden_states.contiguous().view(-1)
    out, h = torch.empty_like(x), torch.empty_like(x)
    logits = ahead = guess = None
    if lean.router is not None:
        src = lean.experts._moestream
        own, nxt = guessing(src, own=True), guessing(src)  # each asked once a layer
        if own or (nxt and src.ahead_norm is not None):
            guess_own(src, lean.weights[8], lean.weights[7], x, lean.router[1], own, nxt)
        logits = torch.empty(1, lean.router[0], dtype=x.dtype)
        if nxt and src.lookahead[1].dtype == x.dtype and src.lookahead[1].is_contiguous():
            ahead = src.lookahead[1]  # the next layer's router on this layer's normed input, in the same call
            guess = torch.empty(1, ahead.shape[0])
    ckernels.attention_block(lean, x, cos.contiguous(), sin.contiguous(), keys, values, positions, out, h, logits,
                             ahead, guess)
    layer.keys, layer.values = keys[:, :, :positions + 1], values[:, :, :positions + 1]
    if lean.router is not None:
        _, k, normalise = lean.router
        probs = torch.softmax(logits, -1, dtype=torch.float32)
        top, index = torch.topk(probs, k, dim=-1)
        if normalise:
            top /= top.sum(dim=-1, keepdim=True)
        src.guess = guess
        y = experts_forward(lean.experts, h.view(1, -1), index, top.to(x.dtype))
    else:
        gate, up, down = lean.mlp
        y = one_token_linear(torch.nn.functional.silu(one_token_linear(h, gate)) * one_token_linear(h, up), down)
    return (out + y.view(-1)).view(1, 1, -1)


def use_lean_decode(model: torch.nn.Module, context: int) -> int:
    """Give every decoder layer plan_layer knows lean_forward (its KV buffers sized for `context` positions);
    returns how many."""
    leans = []
    for layer in model.modules():
        lean = plan_layer(layer, model.config, context) if type(layer).__name__ in LAYERS else None
        if lean is not None:
            layer._moestream_lean = lean
            layer.forward = types.MethodType(lean_forward, layer)
            leans.append(lean)
    # guess_own guesses the next MoE layer from a layer's input with that layer's router and post-attention norm
    norms = {lean.experts._moestream.info.layer: lean.weights[7] for lean in leans if lean.router is not None}
    for lean in leans:
        src = lean.experts._moestream if lean.router is not None else None
        if src is not None and src.lookahead is not None and src.lookahead[1].dtype == lean.weights[7].dtype:
            src.ahead_norm = norms.get(src.lookahead[0].layer)
    return len(leans)
