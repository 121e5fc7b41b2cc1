"""Loading a store into a transformers model whose experts stream from the cache.

transformers builds the model (attention, routing, KV cache: all theirs); we drop the
experts' weights from it, load the dense weights, and register the `moestream` experts
implementation in transformers' `ExpertsInterface`. Every `*Experts` module then calls
`experts_forward` below with the router's choices, and we fetch exactly those experts.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.integrations.moe import ExpertsInterface

from . import ckernels
from .attention import use_fast_attention
from .budget import MemoryPlan, plan_memory, return_large_frees
from .cache import ExpertCache, request_groups, uses_of
from .generate import GenerationStats, Sampling, generate_ids
from .policy import Pinned, make_policy
from .profile import hottest, load_profile
from .kernels import (GroupedWeight, KQuantWeight, rowwise_limit, silu_mlp, use_c_norms, use_matvec_linears,
                      use_matvec_routers, warm_up, warm_up_dense)
from .native import Fp8Linear
from .quant import Int8Weight, expand, replace_linears, use_int8_linears
from .reader import RecordReader, huge_region
from .safetensors_io import read_into
from .skeleton import experts_modules, expert_params, load_config, meta_model
from .store import LayerInfo, Store, StoreError, record_tensors
from .text import TextStream
from .trace import TraceRecorder

IMPLEMENTATION = "moestream"
# compact experts on CPU: torch's packed int8 matmul, and our compiled group-wise kernels (kernels.py)
CPU_KERNELS = hasattr(torch, "_weight_int8pack_mm")


@dataclass
class LayerSource:
    """What one experts module needs to fetch its experts: the cache, its layer's records, where to compute."""

    cache: ExpertCache
    info: LayerInfo
    device: torch.device
    dtype: torch.dtype
    recorder: TraceRecorder | None = None
    lookahead: tuple[LayerInfo, torch.Tensor] | None = None  # the next MoE layer and its router's weight
    silu_gated: bool = False  # transformers' default gating (kernels.silu_mlp may compute the expert whole)
    layout: ckernels.ExpertLayout | None = None  # one token's experts computed straight from record bytes
    int8: bool = False  # ... with int8 activations (load(activations="int8"): opt-in, lossy)
    auto: bool = False  # --prefetch auto: guess only where the cache misses on its own (guessing)
    guess: torch.Tensor | None = None  # the next layer's router logits for this token, when its caller computed
    # them already (decode.lean_forward, beside this layer's own): taken by _prefetch_next
    own: bool = False  # --prefetch lookahead / auto: decode.lean_forward also guesses this layer's own experts
    # from its input before the attention block runs (guess_own)
    ahead_norm: torch.Tensor | None = None  # the next MoE layer's post-attention norm weight, where decode gave it:
    # guess_own then also guesses that layer's first EARLY_NEXT experts


def guessing(src: LayerSource, own: bool = False) -> bool:
    """Whether this layer guesses the next one's experts (`own`: its own, from its input: guess_own): --prefetch
    lookahead, or auto while that layer's cache held, unguessed, under AUTO_PREFETCH_BELOW (own: AUTO_OWN_BELOW)
    of its recent requests."""
    if own:
        return src.own and not (src.auto and src.cache.organic.get(src.info.layer, 0.0) >= AUTO_OWN_BELOW)
    return src.lookahead is not None and not (
        src.auto and src.cache.organic.get(src.lookahead[0].layer, 0.0) >= AUTO_PREFETCH_BELOW)


def _linear(x: torch.Tensor, w: torch.Tensor | Int8Weight | GroupedWeight | KQuantWeight, b: torch.Tensor | None,
            transposed: bool) -> torch.Tensor:
    if isinstance(w, (Int8Weight, GroupedWeight, KQuantWeight)):
        y = w.linear(x)
    else:
        y = x @ w if transposed else F.linear(x, w)
    return y + b if b is not None else y


def _silu_gated(module) -> bool:
    """Experts whose gating is transformers' default (chunk, SiLU(gate) * up), without biases or post-norms:
    the ones kernels.silu_mlp computes whole."""
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate

    return (module.has_gate and not module.has_bias and not module.has_post_expert_norm
            and getattr(type(module), "_apply_gate", None) is _default_apply_gate
            and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)))


def _expert_output(self, src: LayerSource, record: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weighted outputs of one expert, computed from its stored record, for its tokens `x` [n, hidden]
    and their routing weights `scale` [n, 1]."""
    w = record_tensors(record, src.info.tensors)
    if src.device.type != "cpu":  # copy the compact form; expand on the device
        w = {k: v.to(src.device, non_blocking=True) for k, v in w.items()}
    w = expand(w, src.dtype, cpu_kernels=CPU_KERNELS and src.device.type == "cpu", transposed=self.is_transposed)
    input_scaled = getattr(self, "input_scaled", False)  # Llama 4 (adapters.py)
    if input_scaled:
        x = x * scale
    up = "gate_up_proj" if self.has_gate else "up_proj"
    if src.silu_gated and isinstance(w[up], GroupedWeight) and isinstance(w["down_proj"], GroupedWeight) and (
            x.shape[0] <= rowwise_limit(w[up], w["down_proj"])):  # the whole expert in one call (per token)
        y = silu_mlp(x, w[up], w["down_proj"])
    else:
        h = _linear(x, w[up], w.get(f"{up}_bias"), self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = _linear(h, w["down_proj"], w.get("down_proj_bias"), self.is_transposed)
    if self.has_post_expert_norm:
        y = self.post_expert_norm(y)
    return y if input_scaled else y * scale


def _prefetch_next(src: LayerSource, hidden_states: torch.Tensor, k: int, group: list[int]) -> None:
    """Guess the next MoE layer's experts by applying its router to this layer's input, and start
    their reads now, behind this layer's own (a guess only loads records; it cannot change results).
    Best guesses first (each token's first choices, then its second, ...): the cache may take only some."""
    logits, src.guess = src.guess, None
    if not guessing(src):
        return
    info, weight = src.lookahead
    with torch.no_grad():
        if logits is None:
            x = hidden_states.to(weight.dtype)
            # one CPU token: the C matvec (~15 us against ~200 for torch's bf16 matmul here)
            logits = ckernels.dense_matvec(x, weight) if x.shape[0] == 1 and x.device.type == "cpu" else None
            logits = x @ weight.T if logits is None else logits
        guess = torch.topk(logits, k, dim=-1).indices
    order = list(dict.fromkeys(guess.T.flatten().tolist()))
    src.cache.prefetch(info, order, keep=[(src.info.layer, e) for e in group])


def guess_own(src: LayerSource, router: torch.Tensor, norm: torch.Tensor, x: torch.Tensor, k: int, own: bool,
              nxt: bool) -> None:
    """Guess this layer's k experts from its input x, before its attention block runs (the router on the
    post-attention norm of x rather than of x plus attention), and start reading those the cache lacks: their
    reads overlap the attention block. Of such a top-8, bench_decode's model with spread routing had 0.94-0.98
    right in every layer (0.88-0.95 from the previous layer's input); with the concentrated routing of its token
    embeddings at 0.02, 0.61-0.91 from the fourth layer on (0.46-0.88), 0.07-0.32 before (benchmarks/RESULTS.md).
    Where `src.ahead_norm` is known, the next layer's first EARLY_NEXT experts are guessed from x too, so its reads
    start a block earlier than the guess beside the attention's output (_prefetch_next). `own`, `nxt`: the
    caller's guessing(src, own=True) and guessing(src). Only loads records."""
    keep = []
    if own:
        guess = ckernels.router_guess(router, norm, x, k)
        if guess is not None:
            keep = [(src.info.layer, e) for e in guess]
            src.cache.prefetch(src.info, guess, keep=[])
    if nxt and src.ahead_norm is not None and EARLY_NEXT > 0:
        info, weight = src.lookahead
        guess = ckernels.router_guess(weight, src.ahead_norm, x, min(EARLY_NEXT, k))
        if guess is not None:
            src.cache.prefetch(info, guess, keep=keep)


def _experts_one(src: LayerSource, x: torch.Tensor, chosen: list[int], weights: torch.Tensor,
                 final: torch.Tensor) -> None:
    """One token x [1, hidden] through its `chosen` experts straight from their records' bytes (src.layout), each
    output times its routing weight (`weights` [k], in chosen's order) added into final [hidden] in ascending
    expert order: the same sums as transformers' eager loop. Hits are computed in one call shared out among
    the threads, then each miss as its read lands."""
    slot = {e: i for i, e in enumerate(chosen)}
    x32 = x.to(torch.float32).view(-1)
    groups = request_groups(chosen, src.info.experts, src.cache.capacity(src.info),
                            src.cache.pinned.get(src.info.layer, ()))
    for i, group in enumerate(groups):
        fetch = src.cache.fetch(src.info, group)
        if i == 0:
            _prefetch_next(src, x, len(chosen), group)
        ys = torch.empty(len(group), x32.shape[0])
        out = dict(zip(group, ys.unbind(0)))  # each expert's row of ys
        if fetch.ready:
            ckernels.record_mlp(list(fetch.ready.values()), src.layout, x32, [out[e] for e in fetch.ready], src.int8)
        for e, record in fetch.arrivals():
            ckernels.record_mlp([record], src.layout, x32, [out[e]], src.int8)
        slots = [slot[e] for e in group]
        if not ckernels.weighted_sum(ys, slots, weights, final):
            ys = ys.to(final.dtype) * weights[slots, None]
            for j in range(len(group)):  # ascending expert order
                final += ys[j]


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The `moestream` experts implementation: eager transformers' loop, with weights from the cache.

    The union of experts the tokens chose is fetched once (in groups that fit the cache), so a
    prefill chunk reads each expert once, however many of its tokens chose it.
    """
    src: LayerSource = self._moestream
    final = torch.zeros_like(hidden_states)
    if src.recorder is not None:
        src.recorder.record(src.info.layer, top_k_index, top_k_weights)
    one = hidden_states.shape[0] == 1  # one token (decode): it is every chosen expert's only token
    if one and src.layout is not None:
        _experts_one(src, hidden_states, top_k_index[0].tolist(), top_k_weights[0], final.view(-1))
        return final
    if one:
        slot = {e: i for i, e in enumerate(top_k_index[0].tolist())}
        every = torch.zeros(1, dtype=torch.long)
    else:
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=src.info.experts + 1).permute(2, 1, 0)

    def routed(e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token indices, their hidden states, their routing weights [n, 1]) for expert e."""
        if one:
            return every, hidden_states, top_k_weights[:, slot[e], None]
        pos, tok = torch.where(mask[e])
        return tok, hidden_states[tok], top_k_weights[tok, pos, None]

    groups = request_groups(top_k_index, src.info.experts, src.cache.capacity(src.info),
                            src.cache.pinned.get(src.info.layer, ()))
    chosen = None if one else uses_of(top_k_index, src.info.experts)
    for i, group in enumerate(groups):
        fetch = src.cache.fetch(src.info, group, None if one else [chosen[e] for e in group])
        if i == 0:
            _prefetch_next(src, hidden_states, top_k_index.shape[-1], group)
        # Hits first, then each miss as its read lands: compute overlaps the reads still in flight.
        outs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e, record in itertools.chain(fetch.ready.items(), fetch.arrivals()):
            tok, x, scale = routed(e)
            outs[e] = tok, _expert_output(self, src, record, x, scale)
        for e in group:  # accumulate in ascending expert order, as transformers' eager loop does: same bits
            tok, y = outs[e]
            final.index_add_(0, tok, y.to(final.dtype))
    return final


ExpertsInterface.register(IMPLEMENTATION, experts_forward)


def _router(model: PreTrainedModel, experts_name: str, num_experts: int) -> str | None:
    """The router beside an experts module (its name): the sibling with a (num_experts, hidden) weight."""
    parent, own = experts_name.rsplit(".", 1)
    hidden = model.config.get_text_config().hidden_size
    for name, child in model.get_submodule(parent).named_children():
        w = getattr(child, "weight", None)
        if name != own and isinstance(w, torch.Tensor) and tuple(w.shape) == (num_experts, hidden):
            return f"{parent}.{name}"
    return None


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# --prefetch auto guesses a layer's experts while the cache held, unguessed, fewer than this share of its recent
# requests. bench_decode's model with spread routing, in-process, one decode switching settings every 4 tokens (each
# setting on every block in one of two runs; layers held 0.52-0.74 unguessed at 6 GiB): 6 GiB 0.6 8.17, 0.9 9.01
# tok/s; 4 GiB 6.28 / 6.33 (benchmarks/RESULTS.md)
AUTO_PREFETCH_BELOW = 0.9
# the next layer's experts guess_own guesses from a layer's input: of its ranks 1-8, 0.99 / 1.00 / 0.99 / 0.98 /
# 0.97 / 0.94 / 0.84 / 0.65 were chosen (bench_decode's model, 40 tokens at 6 GiB); a wrong guess costs a whole read.
# Measured as AUTO_PREFETCH_BELOW: 6 GiB 8.87 / 8.83 tok/s without, 8.98 / 9.08 with; 4 GiB 6.62 both; 2 GiB 4.75
# against 4.69. 0 turns these guesses off.
EARLY_NEXT = 4
# --prefetch auto guesses a layer's own experts while its cache held, unguessed, under this share of its recent
# requests: whenever it missed lately (a guess costs ~45 us a layer, wasted where every expert hits)
AUTO_OWN_BELOW = 0.99
HUGE_DENSE_MIN = 1 << 20  # tensors this large or larger go into the huge-page region


def _dense_on_huge_pages(model: PreTrainedModel) -> int:
    """Rebind the model's large CPU tensors (allocated, not yet filled) to slices of one huge_region, in module
    order; returns the bytes moved. The decode matvec streams every dense weight once a token: 30-31 GB/s from
    huge pages against 21-22 GB/s from 4 KB pages on this project's Xeon VM (benchmarks/RESULTS.md). A tensor
    shared by several modules moves once and stays shared."""
    slots: dict[int, tuple[torch.Tensor, list[tuple[torch.nn.Module, str, bool]]]] = {}
    for mod in model.modules():
        for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in table.items():
                if t is not None and t.device.type == "cpu" and t.is_contiguous() and t.nbytes >= HUGE_DENSE_MIN:
                    slots.setdefault(id(t), (t, []))[1].append((mod, name, is_param))
    if not slots:
        return 0
    sizes = [(t.nbytes + 63) // 64 * 64 for t, _ in slots.values()]
    region, offset = huge_region(sum(sizes)), 0
    for (t, owners), size in zip(slots.values(), sizes):
        view = region[offset:offset + t.nbytes].view(t.dtype).view(t.shape)
        offset += size
        for mod, name, is_param in owners:
            if is_param:
                mod._parameters[name].data = view  # the same Parameter object: ties and references hold
            else:
                mod._buffers[name] = view
    return offset


def _fill_dense(model: PreTrainedModel, store: Store, device: torch.device) -> None:
    """Allocate the dense weights on `device` (on CPU the large ones on huge pages) and fill them from
    dense.safetensors, tensor by tensor."""
    model.to_empty(device=device)
    if device.type == "cpu":
        _dense_on_huge_pages(model)
    # Non-persistent buffers (rotary inv_freq, ...) are not in any checkpoint: transformers
    # computes them in `_init_weights`, and so do we, before the weights are loaded over.
    owners = {name.rsplit(".", 1)[0] if "." in name else "" for name, _ in model.named_non_persistent_buffers()}
    for name in owners:
        model._init_weights(model.get_submodule(name))
    def target(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        try:
            t = model.get_parameter_or_buffer(key)
        except AttributeError as e:
            raise StoreError(f"{store.dense_path}: tensor {key} has no place in {type(model).__name__}") from e
        if tuple(t.shape) != shape:
            raise StoreError(f"{store.dense_path}: {key} is {shape}, model needs {tuple(t.shape)}")
        return t.data

    with torch.no_grad():
        loaded = set(read_into(store.dense_path, target))
    model.tie_weights()
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    missing = [k for k in model.state_dict() if k not in loaded and k not in tied]
    if missing:
        raise StoreError(f"{store.dense_path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}")


class StreamedModel:
    """A loaded store: `.model` is the transformers model, its experts served by `.cache`."""

    def __init__(self, store: Store, model: PreTrainedModel, tokenizer, cache: ExpertCache, reader: RecordReader,
                 device: torch.device, memory: MemoryPlan, load_seconds: float, recorder: TraceRecorder | None = None,
                 activations: str = "float"):
        self.store = store
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.reader = reader
        self.device = device
        self.memory = memory
        self.load_seconds = load_seconds
        self.recorder = recorder
        self.activations = activations
        self.stats: GenerationStats | None = None

    def chat_mode(self, chat: bool | None) -> bool:
        """Whether a text prompt goes through the chat template: as asked, else when the tokenizer has one."""
        has_template = getattr(self.tokenizer, "chat_template", None) is not None
        if chat and not has_template:
            raise ValueError(f"{self.store.root}: the tokenizer has no chat template; use raw mode")
        return has_template if chat is None else chat

    def encode(self, prompt: str | list[int], chat: bool | None = None) -> list[int]:
        """Token ids for a prompt; in chat mode (see `chat_mode`) as one user turn."""
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError(f"{self.store.root} has no tokenizer files; pass token ids instead of text")
        if self.chat_mode(chat):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if eos is not None:
                ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return ids

    def stream_ids(self, prompt: str | list[int], max_new_tokens: int = 128, chat: bool | None = None,
                   stop_at_eos: bool = True, **sampling) -> Iterator[int]:
        """Generated token ids as they come; `.stats` describes the run once the iterator is exhausted."""
        ids = self.encode(prompt, chat)
        quant = self.store.meta["quant"]
        stats = GenerationStats(load_seconds=self.load_seconds, experts_format=quant["experts"],
                                dense_format=quant.get("dense", "none"), activations=self.activations)
        self.stats = stats
        if self.recorder is not None:
            self.recorder.new_sequence()
        try:
            yield from generate_ids(self.model, ids, max_new_tokens, Sampling(**sampling), self.cache, stats,
                                    eos=self.eos_ids() if stop_at_eos else set(), recorder=self.recorder)
        finally:
            if self.recorder is not None:
                self.recorder.runs.append(stats.to_dict())

    def save_trace(self, path: str | os.PathLike) -> Path:
        """Write the routing recorded so far (load with trace=True) with what the planner needs to know."""
        if self.recorder is None:
            raise ValueError("this model was loaded without trace=True: nothing was recorded")
        return self.recorder.save(path, {
            "model_type": self.store.meta["model_type"], "store": str(self.store.root),
            "source": self.store.meta["source"]["model"], "dense_bytes": self.store.dense_bytes,
            "expert_bytes": self.store.expert_bytes, "device": str(self.device),
            "threads": self.reader.pool._max_workers, "direct": self.reader.direct,
            "cache_budget": self.cache.budget, "cache_policy": self.cache.policy.name,
            "memory_plan": dataclasses.asdict(self.memory),
        })

    def stream(self, prompt: str | list[int], max_new_tokens: int = 128, chat: bool | None = None,
               stop: list[str] | tuple[str, ...] = (), **sampling) -> Iterator[str]:
        """Generated text, piece by piece, as tokens are decoded; ends before the first `stop` string."""
        text = TextStream(self.tokenizer, stop)
        tokens = self.stream_ids(prompt, max_new_tokens, chat, **sampling)
        for t in tokens:
            if piece := text.add(t):
                yield piece
            if text.stopped is not None:
                tokens.close()  # finish the stats
                return
        if piece := text.finish():
            yield piece

    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, chat: bool | None = None,
                 stop: list[str] | tuple[str, ...] = (), **sampling) -> str:
        return "".join(self.stream(prompt, max_new_tokens, chat, stop, **sampling))

    def close(self) -> None:
        self.cache.clear()
        self.reader.close()

    def __enter__(self) -> StreamedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | os.PathLike, memory: int | str | None = None, cache: int | str | None = None,
         device: str | torch.device | None = None, dtype: torch.dtype | str | None = None, verify: bool = False,
         threads: int = 8, direct: bool = True, context: int = 4096, progress: bool = True,
         cache_policy: str = "lfu", cache_scope: str = "global", trace: bool = False, prefetch: str = "auto",
         pin: str | dict | None = None, pin_share: float = 0.5, sequences: int = 1, reserve: bool = True,
         activations: str = "float") -> StreamedModel:
    """Load a store (or a checkpoint directory / hub id, converted once into the local store cache).

    `memory` is the budget for the whole process; `cache` sets the expert cache directly instead.
    `sequences` KV caches of `context` tokens are reserved within `memory` (a server's batch).
    `cache_scope`: "global" (one budget, any layer's miss may evict any layer's expert) or "per-layer" (each
    layer an equal share: ExpertCache.split_budget).
    `reserve`: allocate the expert cache's buffers at load (ExpertCache.reserve) rather than as it fills.
    `prefetch`: "none", "lookahead" (guess the next layer's experts with its router, and in lean decode each
    layer's own and the next one's first EARLY_NEXT before its attention (guess_own), and start their reads), or
    "auto" (the next layer's guesses only while its cache held, unguessed, under AUTO_PREFETCH_BELOW of its
    recent requests, a layer's own under AUTO_OWN_BELOW).
    `activations`: "float" (exact) or "int8" (lossy, opt-in: one-token experts multiply int8-rounded
    activations, as llama.cpp's Q4_0 x Q8_0 does; int4 experts with groups of 32 on AVX-512 VNNI CPUs).
    """
    from .stores import ensure_store

    if activations not in ("float", "int8"):
        raise ValueError(f"--activations {activations!r}: choose float or int8")
    if prefetch not in ("none", "lookahead", "auto"):
        raise ValueError(f"--prefetch {prefetch!r}: choose none, lookahead or auto")
    t0 = time.perf_counter()
    return_large_frees()
    store = ensure_store(str(path), progress=progress)
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or store.dtype
    config = load_config(str(store.root))
    if CPU_KERNELS and device.type == "cpu":  # before planning: the compiler's own memory is then part of the baseline
        warm_up(store.layers)
    plan = plan_memory(store, config, memory=memory, cache=cache, dtype=dtype, context=context, device=device,
                       sequences=sequences)
    config._experts_implementation = IMPLEMENTATION
    model = meta_model(config, dtype)
    experts = experts_modules(model)
    layers = store.layer_by_module()
    if set(layers) != set(experts):
        raise StoreError(f"{store.root}: store has experts for {sorted(layers)}, the model for {sorted(experts)}")
    for mod in experts.values():
        for p in expert_params(mod):
            mod.register_parameter(p, None)
        if getattr(mod, "moestream_adapted", False):  # not built on the experts interface (adapters.py)
            mod.forward = types.MethodType(experts_forward, mod)
    dense_format = store.meta["quant"].get("dense", "none")
    matvec = False
    if dense_format == "int8_channel":
        use_int8_linears(model, dtype)
    elif dense_format.startswith("fp8_e4m3_b"):  # --dense fp8: the checkpoint's FP8 linears kept as stored
        from safetensors import safe_open

        block = tuple(int(b) for b in dense_format.removeprefix("fp8_e4m3_b").split("x"))
        with safe_open(store.dense_path, "pt") as f:
            names = [k.removesuffix(".fp8") for k in f.keys() if k.endswith(".fp8")]
        replace_linears(model, names, lambda i, o, b: Fp8Linear(i, o, b, dtype, block, device="meta"))
    elif CPU_KERNELS and device.type == "cpu" and use_matvec_linears(model, dtype):
        matvec = True
    layouts = {name: ckernels.expert_layout(layers[name].tensors) if _silu_gated(mod) and device.type == "cpu"
               and CPU_KERNELS and not getattr(mod, "is_transposed", False) and not getattr(mod, "input_scaled", False)
               else None for name, mod in experts.items()}
    if activations == "int8":
        refused = sorted(layers[n].layer for n, lay in layouts.items() if lay is None or not ckernels.int8_ok(lay))
        if refused:
            raise ValueError(f"--activations int8: {store.root} layer {refused[0]}'s experts are not int4 with groups "
                             "of 32 computed by the C kernels (AVX-512 VNNI): only those take int8 activations")
    _fill_dense(model, store, device)
    if device.type == "cpu":
        use_fast_attention(model)
        use_c_norms(model)
    routers = {n: _router(model, n, layers[n].experts) for n in experts}
    if matvec:
        use_matvec_routers(model, [r for r in routers.values() if r is not None])
        warm_up_dense(model)
    reader = RecordReader(store, threads=threads, direct=direct, verify=verify)
    policy = make_policy(cache_policy, cache_scope)
    pinned = []
    if pin is not None:
        if not 0 < pin_share <= 1:
            raise ValueError(f"--pin-share must be in (0, 1], got {pin_share}")
        profile = load_profile(pin) if not isinstance(pin, dict) else pin
        pinned = hottest(profile, int(plan.cache * pin_share), {i.layer: i.record_bytes for i in store.layers})
        policy = Pinned(policy, pinned)
    expert_cache = ExpertCache(reader, plan.cache, policy)
    if reserve:
        expert_cache.reserve(store.layers)
    expert_cache.preload(store.layers, pinned)
    if cache_scope == "per-layer":
        expert_cache.split_budget(store.layers)
    recorder = None
    if trace:
        infos = sorted(layers.values(), key=lambda i: i.layer)
        recorder = TraceRecorder([i.layer for i in infos], [i.experts for i in infos], [i.record_bytes for i in infos])
    names = sorted(experts, key=lambda n: layers[n].layer)
    for i, name in enumerate(names):
        ahead = None
        if prefetch != "none" and i + 1 < len(names):
            if routers[names[i + 1]] is not None:
                weight = model.get_submodule(routers[names[i + 1]]).weight
                ahead = (layers[names[i + 1]], torch.Tensor.as_subclass(weight, torch.Tensor))  # no MatvecWeight
            elif prefetch == "lookahead":  # auto guesses where it can
                raise StoreError(f"--prefetch lookahead: no router found beside {names[i + 1]}")
        experts[name]._moestream = LayerSource(expert_cache, layers[name], device, dtype, recorder, ahead,
                                               _silu_gated(experts[name]), layouts[name], activations == "int8",
                                               prefetch == "auto", own=prefetch != "none")
    if matvec:
        from .decode import use_lean_decode  # decode builds on this module's experts_forward

        use_lean_decode(model, context)
    model.eval()
    try:
        model.generation_config = GenerationConfig.from_pretrained(store.root)
    except OSError:
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(store.root)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return StreamedModel(store, model, tokenizer, expert_cache, reader, device, plan, time.perf_counter() - t0,
                         recorder, activations)
