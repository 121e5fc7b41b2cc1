"""Splitting the user's memory budget: runtime, dense weights, KV cache, working buffers, expert cache.

`--memory` is for the whole process, so what the interpreter, torch and transformers already
hold (measured, not guessed) comes off first; the expert cache gets what remains.
"""

from __future__ import annotations

import ctypes
import resource
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from .quant import expanded_values
from .sizes import format_size, parse_size
from .store import Store

PREFILL_CHUNK = 256  # prompt tokens per forward pass: bounds attention scores and activations


class MemoryBudgetError(Exception):
    """The budget cannot hold the dense weights plus at least one expert record."""


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size of this process now."""
    v = _status_kb("VmRSS")
    return v if v is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Highest resident set size this process reached (VmHWM)."""
    v = _status_kb("VmHWM")
    return v if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def return_large_frees(threshold: int = 2**20) -> bool:
    """Have glibc's malloc serve blocks of `threshold` bytes and more from their own mappings, given back
    to the system when freed; True if set. By default glibc raises that threshold after each large free
    (up to 32 MiB), after which expert-sized temporaries (an expert expanded for a prefill chunk, 6-13 MB)
    come from the heap and stay resident after use: anonymous memory 230 MB higher and a 2.08 GB run
    140 MB over its --memory budget (benchmarks/RESULTS.md). A fixed threshold turns that off. No-op where malloc is not glibc's."""
    try:
        return bool(ctypes.CDLL(None).mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 10**9


def kv_cache_bytes(config: PretrainedConfig, tokens: int, dtype: torch.dtype) -> int:
    """KV cache for `tokens` positions as transformers' cache holds it: keys and values per attention
    layer (MLA models keep them decompressed); linear-attention layers hold no per-token cache.
    An upper bound for sliding-window layers."""
    c = config.get_text_config()
    heads = getattr(c, "num_attention_heads", 1)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    k_dim = (getattr(c, "qk_nope_head_dim", 0) or 0) + (getattr(c, "qk_rope_head_dim", 0) or 0) or head_dim
    v_dim = getattr(c, "v_head_dim", None) or head_dim
    types = getattr(c, "layer_types", None) or []
    layers = c.num_hidden_layers - sum(1 for t in types if "linear" in str(t))
    return layers * kv_heads * (k_dim + v_dim) * tokens * dtype.itemsize


def working_bytes(config: PretrainedConfig, context: int) -> int:
    """Activations of one prefill chunk (attention scores dominate), last-token logits, and slack."""
    c = config.get_text_config()
    heads = getattr(c, "num_attention_heads", 1)
    inter = max(getattr(c, "intermediate_size", 0) or 0, getattr(c, "moe_intermediate_size", 0) or 0)
    chunk = PREFILL_CHUNK * (heads * context + 16 * c.hidden_size + 4 * inter) * 4
    return 64 * 2**20 + chunk + 2 * c.vocab_size * 4


@dataclass
class MemoryPlan:
    memory: int | None  # the whole-process budget the user gave (None with --cache)
    baseline: int  # resident before loading: interpreter, torch, transformers
    dense: int
    kv: int
    work: int
    cache: int  # expert cache budget

    def describe(self) -> str:
        if self.memory is None:
            return f"expert cache {format_size(self.cache)} (set directly)"
        return (f"budget {format_size(self.memory)} = runtime {format_size(self.baseline)} + dense "
                f"{format_size(self.dense)} + KV {format_size(self.kv)} + buffers {format_size(self.work)} "
                f"+ expert cache {format_size(self.cache)}")


def plan_memory(store: Store, config: PretrainedConfig, memory=None, cache=None, dtype: torch.dtype | None = None,
                context: int = 4096, device: torch.device | None = None, sequences: int = 1) -> MemoryPlan:
    """The expert cache size for this budget, or MemoryBudgetError before anything is loaded.

    `sequences` KV caches of `context` tokens are reserved (the server decodes several at once)."""
    memory = parse_size(memory, "--memory")
    cache = parse_size(cache, "--cache")
    record = max((i.record_bytes for i in store.layers), default=0)
    dtype = dtype or store.dtype
    dense = store.dense_bytes * dtype.itemsize // store.dtype.itemsize
    kv = kv_cache_bytes(config, context * sequences, dtype)
    work = working_bytes(config, context)
    if dtype != store.dtype or store.meta["quant"]["experts"] != "none":
        # one expert expanded at use, through a float32 intermediate
        work += max((expanded_values(i.tensors) for i in store.layers), default=0) * (4 + dtype.itemsize)
    on_host = device is None or device.type == "cpu"
    host_dense, host_kv = (dense, kv) if on_host else (0, 0)
    baseline = rss_bytes()
    if cache is not None:
        if memory is not None:
            raise ValueError("give --memory or --cache, not both")
        plan = MemoryPlan(None, baseline, dense, kv, work, min(cache, store.expert_bytes))
    else:
        given = memory is not None
        if not given:
            memory = baseline + int(0.8 * available_bytes())
        left = memory - baseline - host_dense - host_kv - work
        plan = MemoryPlan(memory, baseline, dense, kv, work, min(max(left, 0), store.expert_bytes))
        if left < record:
            need = baseline + host_dense + host_kv + work + record
            tokens = f"{sequences} × {context}" if sequences > 1 else str(context)
            what = f"--memory {format_size(memory)}" if given else f"available memory ({format_size(memory)})"
            raise MemoryBudgetError(
                f"{what} is too small for {store.root.name}: the runtime holds {format_size(baseline)}, the dense "
                f"weights need {format_size(host_dense)}, the KV cache for {tokens} tokens {format_size(host_kv)} and "
                f"working buffers {format_size(work)}, leaving {format_size(max(left, 0))} for experts, less than one "
                f"expert record ({format_size(record)}). Give at least {format_size(need)}, or a shorter --context."
            )
    if plan.cache < record:
        raise MemoryBudgetError(
            f"--cache {format_size(plan.cache)} is smaller than one expert record ({format_size(record)})"
        )
    return plan
