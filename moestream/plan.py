"""`moestream plan`: will this model run in this much memory, and how fast, before downloading it.

Sizes come from transformers' own model class built on the meta device (so they are the
architecture's real parameter counts), bytes from the storage format's layout, speed from the
cost model with the SSD's measured (`--probe`) or stated (`--ssd`) bandwidth.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .budget import kv_cache_bytes, rss_bytes, working_bytes
from .costmodel import Machine
from .presets import find_preset, preset_config
from .sizes import format_size, parse_size
from .skeleton import experts_modules, expert_params, load_config, meta_model
from .store import STORE_JSON, align_up
from .native import native_formats
from .stores import is_hub_id

FORMATS: dict[str, str] = {
    "fp32": "float32, 4 bytes per weight",
    "bf16": "bfloat16, 2 bytes per weight",
    "fp16": "float16, 2 bytes per weight",
    "fp8": "e4m3, 1 byte per weight + fp32 scale per 128x128 block (DeepSeek/Kimi native)",
    "int8": "int8 per output channel, 1 byte + bf16 scale per row",
    "int4": "int4 group 32, 0.5 byte + bf16 scale per 32 along K (Kimi K2.5, GGUF Q4_0 sized)",
    "mxfp4": "e2m1 group 32, 0.5 byte + e8m0 scale per 32 along K (GPT-OSS native)",
    "fp4": "e2m1 group 32 with e8m0 scales (DeepSeek V4 native experts; same size as mxfp4)",
}


def matrix_bytes(out_dim: int, in_dim: int, fmt: str) -> int:
    """Stored bytes of one (out, in) weight matrix in `fmt`, scales included."""
    n = out_dim * in_dim
    if fmt == "fp32":
        return 4 * n
    if fmt in ("bf16", "fp16"):
        return 2 * n
    if fmt == "fp8":
        return n + 4 * math.ceil(out_dim / 128) * math.ceil(in_dim / 128)
    if fmt == "int8":
        return n + 2 * out_dim
    if fmt == "int4":
        return n // 2 + 2 * out_dim * math.ceil(in_dim / 32)
    if fmt in ("mxfp4", "fp4"):
        return n // 2 + out_dim * math.ceil(in_dim / 32)
    raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


def param_bytes(shape: tuple[int, ...], fmt: str, transposed: bool = False) -> int:
    """A parameter's stored bytes: matrices in `fmt`, vectors (biases, norms) in bf16."""
    if len(shape) < 2:
        return 2 * math.prod(shape)
    out_dim, in_dim = (shape[-1], shape[-2]) if transposed else (shape[-2], shape[-1])
    return math.prod(shape[:-2]) * matrix_bytes(out_dim, in_dim, fmt)


@dataclass
class ModelSize:
    name: str
    model_type: str
    total_params: int
    dense_params: int
    moe_layers: int
    experts: int  # per MoE layer
    top_k: int
    shared_experts: int
    expert_params: int  # one expert
    expert_shapes: dict[str, tuple[int, ...]]
    transposed: bool
    dense_shapes: dict[str, tuple[int, ...]] = field(repr=False)
    config: object = field(repr=False)

    def expert_bytes(self, fmt: str) -> int:
        """One stored record: every tensor 64-byte aligned, the record 4 KiB aligned."""
        return align_up(sum(align_up(param_bytes(s, fmt, self.transposed), 64) for s in self.expert_shapes.values()))

    def dense_bytes(self, fmt: str, touched_per_token: bool = False) -> int:
        """Matrices inside the layers in `fmt`; embeddings, lm_head, norms and biases in bf16 (as upstream).
        `touched_per_token` leaves out the embedding table, of which a token reads one row."""
        total = 0
        for name, shape in self.dense_shapes.items():
            if touched_per_token and "embed_tokens" in name:
                continue
            low = fmt if ("layers." in name and len(shape) == 2 and min(shape) >= 128) else "bf16"
            total += param_bytes(shape, low)
        return total


def _top_k(config) -> int:
    c = config.get_text_config()
    for a in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"):
        v = getattr(c, a, None)
        if isinstance(v, int):
            return v
    return 1


def _shared(config) -> int:
    c = config.get_text_config()
    n = getattr(c, "n_shared_experts", None)
    if isinstance(n, int):
        return n
    return 1 if (getattr(c, "shared_expert_intermediate_size", 0) or 0) > 0 else 0


def measure(config, name: str) -> ModelSize:
    model = meta_model(config)
    experts = experts_modules(model)
    first = next(iter(experts.values()))
    shapes = {p: tuple(t.shape[1:]) for p, t in expert_params(first).items()}
    expert_names = {f"{m}.{p}" for m, mod in experts.items() for p in expert_params(mod)}
    dense = {n: tuple(p.shape) for n, p in model.named_parameters() if n not in expert_names}
    counts = {t.shape[0] for mod in experts.values() for t in expert_params(mod).values()}
    total = sum(p.numel() for p in model.parameters())
    return ModelSize(name, config.model_type, total, sum(math.prod(s) for s in dense.values()), len(experts),
                     max(counts), _top_k(config), _shared(config), sum(math.prod(s) for s in shapes.values()),
                     shapes, bool(first.is_transposed), dense, config)


@dataclass
class Resolved:
    size: ModelSize
    native_experts: str
    native_dense: str
    source: str
    record_bytes: int | None = None  # a store's real record size


def resolve_model(spec: str) -> Resolved:
    """A preset name, a store, a local checkpoint directory or config.json, or a hub id (config only)."""
    preset = find_preset(spec)
    if preset is not None:
        return Resolved(measure(preset_config(preset), preset.hub_id), preset.experts_format, preset.dense_format,
                        f"preset ({preset.card})")
    p = Path(spec).expanduser()
    if (p / STORE_JSON).is_file():
        meta = json.loads((p / STORE_JSON).read_text())
        fmt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[meta["dtype"]]
        size = measure(load_config(str(p)), meta["source"]["model"])
        return Resolved(size, fmt, fmt, f"store {p}", max(i["record_bytes"] for i in meta["layers"]))
    if p.is_file() and p.name.endswith(".json"):
        p = p.parent
    if (p / "config.json").is_file():
        config = load_config(str(p))
        return Resolved(measure(config, str(p)), *native_formats(config), f"config {p / 'config.json'}")
    if not is_hub_id(spec):
        from .presets import PRESETS
        from .skeleton import UnsupportedModel

        raise UnsupportedModel(f"{spec}: not a preset ({', '.join(PRESETS)}), store, checkpoint directory or hub id")
    from huggingface_hub import hf_hub_download

    cfg = Path(hf_hub_download(spec, "config.json"))
    config = load_config(str(cfg.parent))
    return Resolved(measure(config, spec), *native_formats(config), f"hub config {spec}")


@dataclass
class Plan:
    model: str
    source: str
    experts_format: str
    dense_format: str
    memory: int
    context: int
    runtime_bytes: int
    dense_bytes: int
    kv_bytes: int
    work_bytes: int
    cache_bytes: int
    fits: bool
    record_bytes: int
    total_expert_bytes: int
    cached_experts: int
    hit_rate: float
    hit_rate_source: str
    misses_per_layer: float
    bytes_per_token: float
    machine: Machine
    compute_seconds: float
    compute_source: str
    tps_io_bound: float
    tps_with_compute: float
    formats: dict[str, dict]
    size: ModelSize = field(repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("size")
        d["model_params"] = {"total": self.size.total_params, "dense": self.size.dense_params,
                             "per_expert": self.size.expert_params, "moe_layers": self.size.moe_layers,
                             "experts": self.size.experts, "top_k": self.size.top_k,
                             "shared_experts": self.size.shared_experts}
        return d

    def format(self) -> str:
        s = self.size
        f = format_size
        lines = [
            f"model           {self.model} ({s.model_type}): {s.total_params / 1e9:.1f} B parameters, "
            f"{s.moe_layers} MoE layers x {s.experts} experts, top-{s.top_k}"
            + (f" + {s.shared_experts} shared" if s.shared_experts else ""),
            f"                from {self.source}",
            f"dense           {s.dense_params / 1e9:.2f} B parameters = {f(self.dense_bytes)} as {self.dense_format}",
            f"experts         {s.expert_params / 1e6:.1f} M parameters each; bytes per stored expert and in all:",
        ]
        for name, d in self.formats.items():
            mark = " <- planned" if name == self.experts_format else ""
            lines.append(f"  {name:<6}        {f(d['record_bytes']):>10} per expert  {f(d['total_bytes']):>10} in all{mark}")
        lines += [
            f"memory          {f(self.memory)} = runtime {f(self.runtime_bytes)} + dense {f(self.dense_bytes)} + KV "
            f"for {self.context} tokens {f(self.kv_bytes)} + buffers {f(self.work_bytes)} + expert cache "
            f"{f(self.cache_bytes)}",
        ]
        if not self.fits:
            lines.append("fits            NO: the dense part, KV cache and buffers alone exceed the memory "
                         "(shorten --context, or choose a smaller dense format)")
            return "\n".join(lines)
        lines += [
            f"fits            yes; the cache holds {self.cached_experts} of {s.moe_layers * s.experts} experts "
            f"({100 * self.cached_experts / (s.moe_layers * s.experts):.1f} %)",
            f"hit rate        {100 * self.hit_rate:.1f} % ({self.hit_rate_source})",
            f"read per token  {self.misses_per_layer:.2f} misses per layer -> {f(self.bytes_per_token)} per token",
            f"SSD             {self.machine.bandwidth / 1e9:.2f} GB/s, {self.machine.latency * 1e3:.2f} ms per round of "
            f"{self.machine.queue_depth} reads ({self.machine.source})",
            f"compute         {self.compute_seconds * 1e3:.1f} ms per token ({self.compute_source})",
            f"decode          {self.tps_with_compute:.2f} .. {self.tps_io_bound:.2f} tok/s "
            "(compute not overlapped .. I/O-bound ceiling)",
        ]
        return "\n".join(lines)


def _trace_hit_rate(trace_path: str, fraction: float, size: ModelSize, record_bytes: int
                    ) -> tuple[float, str, float | None]:
    """Decode hit rate from an LRU replay (prefill's first touches left out, as they do not recur per
    token); and, for a trace of this very model, its measured compute per token."""
    from .simulate import simulate
    from .trace import Trace

    t = Trace.load(trace_path)
    total = int((t.num_experts.astype("int64") * t.record_bytes).sum())
    same = (len(t.layers) == size.moe_layers and int(t.num_experts[0]) == size.experts
            and int(t.record_bytes.max()) == record_bytes)
    cache = max(int(t.record_bytes.max()), int(total * fraction))
    r = simulate(t, cache, "lru")
    how = "this model's trace" if same else "a trace of another model, at the same cache share"
    timing = t.decode_timing() if same else None
    hit = r.decode_hit_rate if r.decode_tokens else r.hit_rate
    return hit, f"LRU replay of {trace_path} while decoding: {how}", timing["compute"] if timing else None


def make_plan(spec: str, memory=None, ssd=None, probe_dir: str | None = None, experts_format: str | None = None,
              dense_format: str | None = None, context: int = 4096, trace: str | None = None,
              compute_gbs: float = 10.0, queue_depth: int = 8, latency: float = 0.0, cache=None) -> Plan:
    """The plan for `memory` (whole process), or for an expert cache of `cache` bytes given directly."""
    r = resolve_model(spec)
    size = r.size
    efmt = experts_format or r.native_experts
    dfmt = dense_format or r.native_dense
    for f_ in (efmt, dfmt):
        if f_ not in FORMATS:
            raise ValueError(f"unknown format {f_!r}: choose one of {', '.join(FORMATS)}")
    memory, cache = parse_size(memory, "--memory"), parse_size(cache, "--cache")
    if (memory is None) == (cache is None):
        raise ValueError("give --memory SIZE (the whole-process budget) or --cache SIZE (the expert cache)")
    record = r.record_bytes if (r.record_bytes and efmt == r.native_experts) else size.expert_bytes(efmt)
    n_experts = size.moe_layers * size.experts
    formats = {f_: {"record_bytes": size.expert_bytes(f_), "total_bytes": size.expert_bytes(f_) * n_experts}
               for f_ in ("bf16", "fp8", "int8", "int4", "mxfp4")}
    dense = size.dense_bytes(dfmt)
    kv = kv_cache_bytes(size.config, context, _dtype_of(dfmt))
    work = working_bytes(size.config, context)
    runtime = rss_bytes()
    if cache is not None:
        memory = runtime + dense + kv + work + cache
    left = memory - runtime - dense - kv - work
    cache = max(0, min(left, record * n_experts))
    cached = cache // record if record else 0

    if probe_dir:
        from .probe import probe

        p = probe(probe_dir, record, queue_depth)
        machine = Machine(p.bandwidth, p.latency, queue_depth, source=p.describe())
    else:
        bw = parse_size(str(ssd).replace("/s", ""), "--ssd") if ssd else 2 * 10**9
        machine = Machine(bw, latency, queue_depth,
                          source="--ssd" if ssd else "assumed 2 GB/s; give --ssd or --probe DIR")

    fraction = cached / n_experts if n_experts else 1.0
    measured_compute = None
    if trace:
        hit, how, measured_compute = _trace_hit_rate(trace, fraction, size, record)
    else:
        hit, how = min(1.0, fraction), ("assumed: uniform routing, hit rate = share of experts cached (pessimistic "
                                         "where routing reuses experts; --trace FILE measures it)")
    misses = size.top_k * (1 - hit)
    io = machine.expected_io_seconds(size.top_k, 1 - hit, record, size.moe_layers)
    active = size.dense_bytes(dfmt, touched_per_token=True) + size.moe_layers * size.top_k * record
    if measured_compute is not None:
        compute, compute_source = measured_compute, "measured in the traced run"
    else:
        compute, compute_source = active / (compute_gbs * 1e9), f"assumed {compute_gbs:g} GB/s of weights; --compute-gbs"
    plan = Plan(size.name, r.source, efmt, dfmt, memory, context, runtime, dense, kv, work, cache, left >= record,
                record, record * n_experts, cached, hit, how, misses, misses * record * size.moe_layers, machine,
                compute, compute_source, 1 / io if io > 0 else 1 / compute, 1 / (compute + io), formats, size)
    return plan


def _dtype_of(fmt: str):
    import torch

    return torch.float32 if fmt == "fp32" else torch.bfloat16
