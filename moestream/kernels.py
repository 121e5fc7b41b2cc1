"""CPU kernels for group-quantised expert matrices: int4 and int8 with one scale per group, and the
native float codes (native.py): FP8 e4m3 (its block scales given per row and column block) and FP4
e2m1 with E8M0 scales per 32.

Expanding a compact matrix to floats and then multiplying reads and writes it several times; on
this project's 2-core machines that cost ~10-20 ms per Qwen3-30B-sized int4 matrix, far more than
the product itself. For one token we instead let torch.compile (inductor) fuse unpacking, scaling
and the dot product into one C++ loop that reads the compact bytes once (measured 0.30 ms for a
1536x2048 int4 matrix against 7-15 ms expanding it eagerly: benchmarks/bench_kernels.py), token by
token up to MATVEC_ROWS tokens; for more the matrix is expanded once by a fused kernel and
multiplied with F.linear.

On AVX-512 CPUs the int4 / e2m1 products go to hand-written C kernels instead (ckernels.py: about half the
compiled kernel's time per expert and token), token by token up to C_ROWS tokens, and decode reads experts
straight from their records.

The dense weights (bf16 or fp16) get the same treatment for one token: torch's half-precision gemv
reaches 13-18 GB/s here, a compiled row-dot summing in float32 27-33 GB/s (MatvecLinear, and
MatvecWeight for routers), the C kernel about the same without the compiled call's overhead.

Where compiling is impossible (no C++ compiler, an unsupported platform) the same arithmetic runs
eagerly; the first failure is reported once.
"""

from __future__ import annotations

import inspect
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ckernels, kquants


def _nibble(n: torch.Tensor, codes: str) -> torch.Tensor:
    """A 4-bit code's value in float32: int4 stored +8, or e2m1 (sign, 2 exponent bits, 1 mantissa bit).
    e2m1 is decoded with integer shifts as twice its value (0, 1, 2, 3, 4, 6, 8, 12), then halved: inductor
    vectorises that (4x faster than float where/exp2 here; a table lookup it does not vectorise)."""
    if codes in ("int4", "uint4"):  # uint4: the zero point is applied per group by the caller
        return n.to(torch.float32) - (8 if codes == "int4" else 0)
    n = n.to(torch.int32)
    e, m = (n >> 1) & 3, n & 1
    twice = torch.where(e == 0, m, ((2 + m) << e) >> 1)
    return (twice * (1 - ((n >> 2) & 2))).to(torch.float32) * 0.5


def _unpacked(q: torch.Tensor, groups: int, codes: str) -> torch.Tensor:
    """[rows, groups, group] float32 values: int8 or e4m3 as they are, or two 4-bit codes per byte, low first."""
    rows = q.shape[0]
    if q.dtype != torch.uint8:
        return q.view(rows, groups, -1).to(torch.float32)
    qq = q.view(rows, groups, -1, 1)
    return torch.cat([_nibble(qq & 15, codes), _nibble(qq >> 4, codes)], dim=-1).view(rows, groups, -1)


def grouped_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, codes: str,
                   zero: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, cols] times the matrix (q, scale[, zero]) transposed: [1, rows]; sums in float32. A zero point
    enters once per group, as scale * zero * sum(x over the group).

    Written as one long reduction per row (scale applied per term) rather than per-group sums then a
    sum over groups: inductor then vectorises along the row, 3x faster than the short per-group sums."""
    rows, groups = q.shape[0], scale.shape[1]
    if q.dtype != torch.uint8:
        terms = q.view(rows, groups, -1).to(torch.float32) * x.to(torch.float32).view(1, groups, -1)
    else:  # the nibble pairs of each byte against the matching pairs of x
        qq = q.view(rows, groups, -1)
        xv = x.to(torch.float32).view(1, groups, -1, 2)
        terms = _nibble(qq & 15, codes) * xv[..., 0] + _nibble(qq >> 4, codes) * xv[..., 1]
    y = (terms * scale.to(torch.float32)[:, :, None]).sum((1, 2))
    if zero is not None:
        xsum = x.to(torch.float32).view(1, groups, -1).sum(-1)
        y = y - (scale.to(torch.float32) * zero * xsum).sum(1)
    return y.view(1, -1).to(x.dtype)


def grouped_expand(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, codes: str,
                   zero: torch.Tensor | None = None) -> torch.Tensor:
    """The matrix in `dtype`, [rows, cols]."""
    vals = _unpacked(q, scale.shape[1], codes)
    if zero is not None:
        vals = vals - zero[:, :, None]
    w = vals * scale.to(torch.float32)[:, :, None]
    return w.view(q.shape[0], -1).to(dtype)


class _Compiled:
    """torch.compile(fn) on first use, falling back to `fn` itself (and saying so once) if that fails."""

    failed: str | None = None

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if _Compiled.failed is None:
            try:
                if self.compiled is None:
                    import torch._dynamo

                    # one graph per matrix shape; a model has a few, a test session many
                    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
                    self.compiled = torch.compile(self.fn, dynamic=False)
                return self.compiled(*args)
            except Exception as e:  # no compiler, unsupported platform: the eager path computes the same
                _Compiled.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"note: compiled CPU kernels unavailable, using eager ones ({_Compiled.failed})",
                      file=sys.stderr)
        return self.fn(*args)


_matvec = _Compiled(grouped_matvec)
# up to this many tokens the fused matvec per token beats expanding the matrix once (0.2-0.3 ms per
# token and matrix against ~3 ms to expand a Qwen3-30B-sized one: benchmarks/bench_kernels.py)
MATVEC_ROWS = 8
# with the C kernels token by token stays ahead of expanding further: measured per Qwen3-30B-sized int4 expert,
# 4.4 against 6.8 ms at 32 tokens, level at 64 (benchmarks/RESULTS.md)
C_ROWS = 32
_expand = _Compiled(grouped_expand)
# For more tokens the matrix is expanded this many float32 bytes of rows at a time: under the malloc mmap
# threshold budget.return_large_frees pins (1 MiB), so these temporaries are recycled by the heap instead
# of each being a fresh mapping the kernel must fault in and zero (a whole 1536x2048 expansion at once
# measured 13 ms that way against 1.8 ms from the heap), and never a large block for the heap to fragment.
EXPAND_BYTES = 2**19


def chunked_linear(x: torch.Tensor, rows: int, cols: int, expand_rows) -> torch.Tensor:
    """x [tokens, cols] times a [rows, cols] matrix transposed, expanding EXPAND_BYTES of its rows at a
    time: `expand_rows(i, j)` gives rows i..j-1 in float32."""
    step = max(1, EXPAND_BYTES // (cols * 4))
    return torch.cat([F.linear(x, expand_rows(i, min(i + step, rows)).to(x.dtype)) for i in range(0, rows, step)],
                     dim=-1)


@dataclass(frozen=True)
class GroupedWeight:
    """A matrix [rows, cols] kept compact with one scale per group along its rows: int8 or e4m3 values
    (q of that dtype), or two 4-bit codes per byte (uint8; `codes` 'int4' or 'e2m1')."""

    q: torch.Tensor
    scale: torch.Tensor  # [rows, groups]
    codes: str = "int4"  # or "uint4" with `zero`, "e2m1"; ignored for int8 / e4m3 q
    zero: torch.Tensor | None = None  # float32 [rows, groups] zero points (int4z)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        # float32 in, float32 out of the compiled graphs: inductor stops vectorising when bf16 and fp16
        # meet in one kernel (measured 5x slower with bf16 activations and fp16 GGUF scales)
        if ckernels.takes(self) and x.shape[0] <= C_ROWS:
            return ckernels.matvec(x.to(torch.float32).contiguous(), self).to(x.dtype)
        if x.shape[0] <= MATVEC_ROWS:  # a few tokens (most experts in a prefill chunk or a batch): row by row
            xf = x.to(torch.float32)
            scale = self.scale.to(torch.float32)
            return torch.cat([_matvec(xf[i:i + 1].contiguous(), self.q, scale, self.codes, self.zero)
                              for i in range(x.shape[0])]).to(x.dtype)
        scale = self.scale.to(torch.float32)
        zero = self.zero
        return chunked_linear(x, self.q.shape[0], x.shape[1], lambda i, j: _expand(
            self.q[i:j], scale[i:j], torch.float32, self.codes, None if zero is None else zero[i:j]))

    def expanded(self, dtype: torch.dtype) -> torch.Tensor:
        return _expand(self.q, self.scale.to(torch.float32), torch.float32, self.codes, self.zero).to(dtype)


def grouped_mlp(x: torch.Tensor, gq: torch.Tensor, gs: torch.Tensor, gcodes: str, gzero: torch.Tensor | None,
                dq: torch.Tensor, ds: torch.Tensor, dcodes: str, dzero: torch.Tensor | None) -> torch.Tensor:
    """One token [1, hidden] through a SiLU-gated expert (gate_up, then silu(gate) * up, then down), all in
    float32 in one compiled graph: one call per expert and token instead of two plus eager gating."""
    gate, up = grouped_matvec(x, gq, gs, gcodes, gzero).chunk(2, dim=-1)
    return grouped_matvec(F.silu(gate) * up, dq, ds, dcodes, dzero)


_mlp = _Compiled(grouped_mlp)


def silu_mlp(x: torch.Tensor, gate_up: GroupedWeight, down: GroupedWeight) -> torch.Tensor:
    """x [tokens <= rowwise_limit(gate_up, down), hidden] through a SiLU-gated expert kept compact: one C call
    where the C kernels take the weights, else grouped_mlp token by token (measured 0.33 against 0.40 ms per
    Qwen3-30B-sized int4 expert for the two-call path)."""
    xf = x.to(torch.float32)
    if gate_up.codes == down.codes and ckernels.takes(gate_up) and ckernels.takes(down):
        return ckernels.silu_mlp(xf.contiguous(), gate_up, down).to(x.dtype)
    gs, ds = gate_up.scale.to(torch.float32), down.scale.to(torch.float32)
    return torch.cat([_mlp(xf[i:i + 1].contiguous(), gate_up.q, gs, gate_up.codes, gate_up.zero, down.q, ds,
                           down.codes, down.zero) for i in range(x.shape[0])]).to(x.dtype)


_kq_scales = _Compiled(kquants.scales)
_kq_matvec = _Compiled(kquants.matvec)
_kq_expand = _Compiled(kquants.dequantize)


@dataclass(frozen=True)
class KQuantWeight:
    """A matrix kept in llama.cpp's K-quant blocks ([rows, bytes], kquants.BLOCK_BYTES types), computed by the C
    kernels up to C_ROWS tokens where they build."""

    blocks: torch.Tensor
    type_name: str

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if ckernels.takes_kquant(self) and x.shape[0] <= C_ROWS:
            return ckernels.kquant_matvec(x.to(torch.float32).contiguous(), self).to(x.dtype)
        if x.shape[0] <= MATVEC_ROWS:
            scale, minus = _kq_scales(self.blocks, self.type_name)
            xf = x.to(torch.float32)
            return torch.cat([_kq_matvec(xf[i:i + 1].contiguous(), self.blocks, scale, minus, self.type_name)
                              for i in range(x.shape[0])]).to(x.dtype)
        return chunked_linear(x, self.blocks.shape[0], x.shape[1],
                              lambda i, j: _kq_expand(self.blocks[i:j], self.type_name))

    def expanded(self, dtype: torch.dtype) -> torch.Tensor:
        return _kq_expand(self.blocks, self.type_name).to(dtype)


def rowwise_limit(*weights) -> int:
    """Up to how many tokens the products with these weights go token by token rather than expanded."""
    c = all(ckernels.takes(w) if isinstance(w, GroupedWeight) else isinstance(w, KQuantWeight)
            and ckernels.takes_kquant(w) for w in weights)
    return C_ROWS if c else MATVEC_ROWS


def dense_matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [1, in] times w [out, in] transposed, summed in float32: [1, out] float32."""
    return (x.to(torch.float32) * w.to(torch.float32)).sum(-1).view(1, -1)


_dense = _Compiled(dense_matvec)


def half_matvec(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dense_matvec for a half-precision w, in `dtype` (float32 sums rounded to it as `.to(dtype)` rounds): the C
    kernel where it takes it (no compiled-call overhead, ~20-40 us of guards and wrappers per call here), else the
    compiled one."""
    y = ckernels.dense_matvec(x, w, dtype)
    return _dense(x, w).to(dtype) if y is None else y


def one_token_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """F.linear(x, w) without bias by half_matvec when x is one CPU token (decode), in x's dtype and shape; None
    otherwise (the caller lets torch compute it)."""
    if x.device.type != "cpu" or x.shape[:-1].numel() != 1:
        return None
    return half_matvec(x.reshape(1, -1), w, x.dtype).view(*x.shape[:-1], -1)


class MatvecLinear(torch.nn.Linear):
    """nn.Linear with half-precision weights whose one-token calls (decode) on CPU run half_matvec: the same
    products summed in float32 as F.linear, in another order. Measured here on a 4096x2048 bf16 matrix (the
    compiled kernel): 0.62 ms against 0.94 ms for F.linear; a resident decode token of bench_decode's 24-layer
    model went from 210 to 152-155 ms (issue 4's note)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = one_token_linear(x, self.weight)
        if y is None:
            return super().forward(x)
        return y + self.bias if self.bias is not None else y


class MatvecWeight(torch.nn.Parameter):
    """A half-precision weight whose one-token F.linear calls on CPU run half_matvec, like MatvecLinear's.
    For the routers of most MoE families, modules that call F.linear on their own weight (so swapping
    nn.Linear misses them): torch's bf16 matmul of [1, 2048] by a [128, 2048] router measured 0.28 ms per
    call inside decode (0.03 ms alone), dense_matvec 0.03 ms."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func is F.linear and len(args) == 2 and not kwargs and isinstance(args[1], MatvecWeight):
                y = one_token_linear(args[0], args[1].as_subclass(torch.Tensor))
                if y is not None:
                    return y
            return func(*args, **kwargs)


def use_matvec_routers(model: torch.nn.Module, names: list[str]) -> int:
    """Make the half-precision CPU weights of the modules `names` (routers) MatvecWeights; returns how many."""
    n = 0
    for name in names:
        m = model.get_submodule(name)
        w = m.weight
        if w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16) and not isinstance(m, MatvecLinear):
            m.weight = MatvecWeight(w.detach(), requires_grad=False)
            n += 1
    return n


# transformers' standard RMSNorm forward (Llama's, copied into most families), whitespace removed
_RMS_NORM_BODY = ("input_dtype=hidden_states.dtypehidden_states=hidden_states.to(torch.float32)"
                  "variance=hidden_states.pow(2).mean(-1,keepdim=True)"
                  "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)"
                  "returnself.weight*hidden_states.to(input_dtype)")


def _standard_rms_norm(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    head, _, body = source.partition("\n")
    return head.strip().startswith("def forward(") and "".join(body.split()) == _RMS_NORM_BODY


def _c_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    y = ckernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return y if y is not None else type(self).forward(self, hidden_states)


def use_c_norms(model: torch.nn.Module) -> int:
    """Give the RMSNorm modules whose forward is transformers' standard one the C kernel (ckernels.rms_norm: the
    same float32 arithmetic, the sum of squares in another order, in one call instead of eight torch ops; 7
    against 24 us for [1, 2048] bf16 here, about 100 calls a decode token); returns how many. Any other
    normalisation (Gemma's 1 + weight, ...) keeps its own forward."""
    if not ckernels.available():
        return 0
    standard: dict[type, bool] = {}
    n = 0
    for m in model.modules():
        cls = type(m)
        if cls not in standard:
            standard[cls] = _standard_rms_norm(cls)
        if standard[cls] and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1:
            m.forward = types.MethodType(_c_rms_norm, m)
            n += 1
    return n


def use_matvec_linears(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Swap the model's plain nn.Linear modules for MatvecLinear (on the meta device, before the weights
    load) when its dense weights are bf16 or fp16; returns the names swapped."""
    from .quant import replace_linears

    if dtype not in (torch.bfloat16, torch.float16):
        return []
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    replace_linears(model, names, lambda i, o, b: MatvecLinear(i, o, b, device="meta", dtype=dtype))
    return names


def warm_up_dense(model: torch.nn.Module) -> int:
    """Compile dense_matvec for each MatvecLinear and MatvecWeight shape with its own (loaded) weight, so the first
    token does not compile; returns how many shapes. After loading, as the weights are needed: a few MB of
    compiler state, within the plan's working buffers."""
    shapes = {}
    for m in model.modules():
        if isinstance(m, MatvecLinear) or isinstance(getattr(m, "weight", None), MatvecWeight):
            shapes.setdefault(tuple(m.weight.shape), m)
    with torch.inference_mode():
        for m in shapes.values():
            x = torch.zeros(1, m.weight.shape[1], dtype=m.weight.dtype)
            m(x) if isinstance(m, MatvecLinear) else F.linear(x, m.weight)
    return len(shapes)


def joined(pieces: list) -> GroupedWeight | KQuantWeight | None:
    """Row pieces (gate, up) as one compact weight, when all are compact in the same form; else None."""
    if all(isinstance(w, KQuantWeight) for w in pieces) and len({(w.type_name, w.blocks.shape[1])
                                                                 for w in pieces}) == 1:
        return KQuantWeight(torch.cat([w.blocks for w in pieces]), pieces[0].type_name)
    forms = {(w.codes, w.q.dtype, w.q.shape[1], w.scale.shape[1], w.zero is None) if isinstance(w, GroupedWeight)
             else None for w in pieces}
    if None in forms or len(forms) != 1 or pieces[0].zero is not None:
        return None
    return GroupedWeight(torch.cat([w.q for w in pieces]), torch.cat([w.scale.to(torch.float32) for w in pieces]),
                         pieces[0].codes)


def warm_up(layers) -> int:
    """Compile every kernel the compact matrix forms in these store layers use (one token, a chunk, the whole
    expert) now, at load: not inside the first token's or first long prompt's time, and before the memory
    plan measures the runtime's own footprint; returns how many forms. Each distinct record layout is
    expanded once from zeros exactly as the runtime expands records, so joined pieces are covered too."""
    from .quant import expand
    from .store import DTYPES

    layouts, shapes = set(), set()
    with torch.inference_mode():
        for info in layers:
            layout = tuple((t.name, t.dtype, tuple(t.shape)) for t in info.tensors)
            if layout in layouts:
                continue
            layouts.add(layout)
            parts = {name: torch.zeros(shape, dtype=DTYPES[dtype]) for name, dtype, shape in layout}
            weights = expand(parts, torch.float32, cpu_kernels=True)
            gate_up, down = weights.get("gate_up_proj"), weights.get("down_proj")
            if isinstance(gate_up, GroupedWeight) and isinstance(down, GroupedWeight):  # the fused expert too
                cols = gate_up.q.shape[1] * (2 if gate_up.q.dtype == torch.uint8 else 1)
                silu_mlp(torch.zeros(1, cols), gate_up, down)
            for w in weights.values():
                if isinstance(w, GroupedWeight):
                    form = (tuple(w.q.shape), w.q.dtype, tuple(w.scale.shape), w.codes, w.zero is None)
                    cols = w.q.shape[1] * (2 if w.q.dtype == torch.uint8 else 1)
                elif isinstance(w, KQuantWeight):
                    form = (tuple(w.blocks.shape), w.type_name)
                    cols = w.blocks.shape[1] // kquants.BLOCK_BYTES[w.type_name] * kquants.QK_K
                else:
                    continue
                if form not in shapes:  # one token (the fused matvec) and a chunk (the compiled expansion)
                    shapes.add(form)
                    w.linear(torch.zeros(1, cols))
                    w.linear(torch.zeros(rowwise_limit(w) + 1, cols))
    return len(shapes)
