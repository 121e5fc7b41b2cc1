"""Lossy, opt-in compact expert formats, quantised at convert and expanded one expert at a time at use.

  int8   symmetric, one scale per row (output channel), bf16 scales
  int4   symmetric, one scale per group of `group` values along a row, two values per byte, bf16 scales
  int4z  int4 with a zero point per group (asymmetric: each group's min..max onto 0..15), bf16 scales,
         uint8 zero points (`name.zero`); finer where a group's values are not centred on zero

A record then holds, per matrix `name`, `name.q` (int8, or uint8 with two int4 per byte) and
`name.scale`; vectors (biases) stay as they were. Rows are the stored layout's rows: for modules
stored transposed (GPT-OSS) that groups along the output dimension, still symmetric and exact in
its own terms.

Imported GGUF files add (gguf_import.py): int8 with one scale per group of 32 (`scale` is 2-D: Q8_0),
int4 with fp16 scales (Q4_0), both bit-exact transcodes; `name.gguf_TYPE`, a matrix kept in
llama.cpp's own blocks (K-quants and the rest) and dequantised at use by the `gguf` package; and
`name#0`, `name#1`: row pieces of one matrix stored separately (gate and up in different formats),
joined after expansion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import GroupedWeight, KQuantWeight, joined
from .kquants import BLOCK_BYTES as KQUANT_BYTES
from .native import dequantize_part, grouped_part, is_scale_part

SCHEMES = ("int8", "int4", "int4z")


def scheme_name(scheme: str, group: int) -> str:
    return "int8_channel" if scheme == "int8" else f"{scheme}_g{group}"


def quantize(t: torch.Tensor, scheme: str, group: int = 32) -> dict[str, torch.Tensor]:
    """{'q': ..., 'scale': ...} for a 2-D tensor; its dtype and shape are recorded by the caller."""
    if t.dim() != 2:
        raise ValueError(f"only matrices are quantised, got shape {tuple(t.shape)}")
    x = t.float()
    if scheme == "int8":
        scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
        q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
        return {"q": q, "scale": scale.squeeze(1).to(torch.bfloat16)}
    if scheme in ("int4", "int4z"):
        rows, cols = x.shape
        if cols % group or group % 2:
            raise ValueError(f"int4 group {group} must be even and divide the row length {cols}")
        g = x.view(rows, cols // group, group)
        if scheme == "int4":
            scale = (g.abs().amax(dim=2, keepdim=True) / 7).clamp(min=1e-12)
            q = (torch.round(g / scale).clamp(-8, 7).to(torch.int16) + 8).view(rows, cols).to(torch.uint8)
            return {"q": q[:, 0::2] | (q[:, 1::2] << 4), "scale": scale.squeeze(2).to(torch.bfloat16)}
        lo, hi = g.amin(dim=2, keepdim=True).clamp(max=0), g.amax(dim=2, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16).float()  # the stored scale is what counts
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = torch.round(g / scale + zero).clamp(0, 15).to(torch.uint8).view(rows, cols)
        return {"q": q[:, 0::2] | (q[:, 1::2] << 4), "scale": scale.squeeze(2).to(torch.bfloat16),
                "zero": zero.squeeze(2).to(torch.uint8)}
    raise ValueError(f"unknown experts format {scheme!r}: choose one of {', '.join(SCHEMES)}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, zero: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The matrix in `dtype`, from its stored parts (the scheme is told by q's dtype, scale's shape, and a
    zero point's presence)."""
    if q.dtype == torch.int8:
        if scale.dim() == 2:  # one scale per group along the row
            rows, cols = q.shape
            w = q.view(rows, scale.shape[1], -1).to(torch.float32) * scale.to(torch.float32)[:, :, None]
            return w.view(rows, cols).to(dtype)
        return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)
    rows = q.shape[0]
    vals = torch.stack([(q & 0x0F), (q >> 4)], dim=-1).view(rows, -1).to(torch.int16)
    groups = scale.shape[1]
    vals = vals.view(rows, groups, -1) - (8 if zero is None else zero.to(torch.int16)[:, :, None])
    w = vals.to(torch.float32) * scale.to(torch.float32)[:, :, None]
    return w.view(rows, -1).to(dtype)


@dataclass(frozen=True)
class Int8Weight:
    """An int8 matrix kept packed, for torch's int8 matmul (`_weight_int8pack_mm`): measured ~10x faster
    per expert than expanding it first on this project's CPUs (benchmarks/bench_kernels.py)."""

    q: torch.Tensor
    scale: torch.Tensor  # in the compute dtype, as the kernel wants

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.contiguous(), self.q, self.scale)


def int8_linears(model) -> list[str]:
    """The nn.Linear modules `--dense int8` quantises: every one but tiny ones (fewer than 32 outputs, such
    as a shared-expert gate) and those whose weight is tied to another tensor. Routers are not nn.Linear."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m.out_features >= 32
            and f"{n}.weight" not in tied]


class Int8Linear(torch.nn.Module):
    """An nn.Linear whose weight is int8 per output channel (`qweight`, `wscale`): torch's packed int8
    matmul on CPU, expanded per call elsewhere."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("wscale", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        if flat.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
            y = torch._weight_int8pack_mm(flat, self.qweight, self.wscale.to(x.dtype))
        else:
            y = torch.nn.functional.linear(flat, self.qweight.to(x.dtype) * self.wscale.to(x.dtype)[:, None])
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def replace_linears(model, names, make) -> None:
    """Swap the nn.Linear modules `names` for `make(in_features, out_features, has_bias)` (on the meta device,
    before the weights load): the dense weights a store keeps compact (`--dense int8` / `fp8`)."""
    for name in names:
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent) if parent else model, child,
                make(old.in_features, old.out_features, old.bias is not None))


def use_int8_linears(model, dtype: torch.dtype) -> None:
    """Swap the modules `int8_linears` names for Int8Linear."""
    replace_linears(model, int8_linears(model), lambda i, o, b: Int8Linear(i, o, b, dtype, device="meta"))


GGUF_SUFFIX = ".gguf_"


def gguf_type(name: str):
    import gguf

    try:
        return gguf.GGMLQuantizationType[name]
    except KeyError:
        raise ValueError(f"unknown GGUF tensor type {name!r}") from None


def dequantize_gguf(blocks: torch.Tensor, type_name: str, dtype: torch.dtype) -> torch.Tensor:
    """A matrix kept in llama.cpp's blocks ([rows, bytes per row], uint8), in `dtype`, by the gguf package's
    (numpy, vectorised) dequantiser: the same arithmetic as llama.cpp's reference dequantisation."""
    from gguf.quants import dequantize as gguf_dequantize

    device = blocks.device
    w = torch.from_numpy(gguf_dequantize(blocks.cpu().numpy(), gguf_type(type_name)))
    return w.to(device=device, dtype=dtype)


def expanded_values(slots) -> int:
    """Values of a record once every matrix is expanded (what a memory plan reserves room for)."""
    import gguf

    n = 0
    for s in slots:
        count = 1
        for d in s.shape:
            count *= d
        if is_scale_part(s.name):
            continue
        if s.name.endswith(".fp4"):
            count *= 2
        elif GGUF_SUFFIX in s.name:
            block, size = gguf.GGML_QUANT_SIZES[gguf_type(s.name.split(GGUF_SUFFIX)[1])]
            count = count // size * block
        elif s.name.endswith(".q") and s.dtype == "uint8":
            count *= 2
        n += count
    return n


def expand(parts: dict[str, torch.Tensor], dtype: torch.dtype, cpu_kernels: bool = False,
           transposed: bool = False) -> dict:
    """A record's tensors ready to compute with: `name.q` + `name.scale` dequantised into `name` (or, with
    `cpu_kernels`, kept compact: per-channel int8 as an Int8Weight, group-wise int4/int8 as a
    kernels.GroupedWeight), GGUF blocks dequantised, native fp8/fp4 parts kept compact (`cpu_kernels`) or
    dequantised, row pieces joined, everything else cast to `dtype`.

    `transposed`: the module keeps its weights as [in, out] (GPT-OSS). Native parts are stored [out, in]
    as upstream stores them, so dequantised they are transposed (a GroupedWeight computes x @ W.T itself);
    int8/int4 records of such a module were quantised in its own layout and need no transposition."""
    out, native = {}, set()
    for name, t in parts.items():
        if name.endswith(".q"):
            base = name[:-2]
            scale, zero = parts[base + ".scale"], parts.get(base + ".zero")
            kernels = cpu_kernels and not transposed and "#" not in base
            if kernels and t.dtype == torch.int8 and scale.dim() == 1:
                out[base] = Int8Weight(t, scale.to(dtype))
            elif kernels and scale.dim() == 2:
                out[base] = GroupedWeight(t, scale, "int4" if zero is None else "uint4",
                                          None if zero is None else zero.to(torch.float32))
            else:
                out[base] = dequantize(t, scale, dtype, zero)
        elif name.endswith((".fp8", ".fp4")):
            base = name.rsplit(".", 1)[0]
            w = grouped_part(base, parts) if cpu_kernels else None
            out[base] = w if w is not None else dequantize_part(base, parts).to(dtype)
            native.add(base.split("#")[0])
        elif GGUF_SUFFIX in name:
            base, type_name = name.split(GGUF_SUFFIX)
            if cpu_kernels and not transposed and type_name in KQUANT_BYTES:
                out[base] = KQuantWeight(t, type_name)
            else:
                out[base] = dequantize_gguf(t, type_name, dtype)
        elif not is_scale_part(name):
            out[name] = t if t.dtype == dtype else t.to(dtype)
    for base in sorted({n.split("#")[0] for n in out if "#" in n}):
        pieces = [out.pop(n) for n in sorted((n for n in out if n.startswith(base + "#")),
                                              key=lambda n: int(n.split("#")[1]))]
        out[base] = joined(pieces) or torch.cat([w.expanded(dtype) if isinstance(w, (GroupedWeight, KQuantWeight))
                                                 else w for w in pieces])
    for base in native:
        if transposed and not isinstance(out[base], GroupedWeight):
            out[base] = out[base].T
    return out
