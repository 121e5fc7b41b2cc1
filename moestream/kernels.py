"""CPU kernels for group-quantised expert matrices (int4 and int8 with one scale per group).

Expanding a compact matrix to floats and then multiplying reads and writes it several times; on
this project's 2-core machines that cost ~10-20 ms per Qwen3-30B-sized int4 matrix, far more than
the product itself. For one token we instead let torch.compile (inductor) fuse unpacking, scaling
and the dot product into one C++ loop that reads the compact bytes once (measured 0.30 ms for a
1536x2048 int4 matrix against 7-15 ms expanding it eagerly: benchmarks/bench_kernels.py), token by
token up to MATVEC_ROWS tokens; for more the matrix is expanded once by a fused kernel and
multiplied with F.linear.

Where compiling is impossible (no C++ compiler, an unsupported platform) the same arithmetic runs
eagerly; the first failure is reported once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _unpacked(q: torch.Tensor, groups: int) -> torch.Tensor:
    """[rows, groups, group] float32 values q (int8) or q - 8 (uint8: two int4 per byte, low nibble first)."""
    rows = q.shape[0]
    if q.dtype == torch.int8:
        return q.view(rows, groups, -1).to(torch.float32)
    qq = q.view(rows, groups, -1, 1)
    return (torch.cat([qq & 15, qq >> 4], dim=-1).to(torch.float32) - 8).view(rows, groups, -1)


def grouped_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [1, cols] times the matrix (q, scale) transposed: [1, rows]; sums in float32.

    Written as one long reduction per row (scale applied per term) rather than per-group sums then a
    sum over groups: inductor then vectorises along the row, 3x faster than the short per-group sums."""
    rows, groups = q.shape[0], scale.shape[1]
    if q.dtype == torch.int8:
        terms = q.view(rows, groups, -1).to(torch.float32) * x.to(torch.float32).view(1, groups, -1)
    else:  # the nibble pairs of each byte against the matching pairs of x
        qq = q.view(rows, groups, -1)
        xv = x.to(torch.float32).view(1, groups, -1, 2)
        terms = ((qq & 15).to(torch.float32) - 8) * xv[..., 0] + ((qq >> 4).to(torch.float32) - 8) * xv[..., 1]
    return (terms * scale.to(torch.float32)[:, :, None]).sum((1, 2)).view(1, -1).to(x.dtype)


def grouped_expand(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The matrix in `dtype`, [rows, cols]."""
    w = _unpacked(q, scale.shape[1]) * scale.to(torch.float32)[:, :, None]
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
_expand = _Compiled(grouped_expand)


@dataclass(frozen=True)
class GroupedWeight:
    """An int4 (uint8, two per byte) or int8 matrix with one scale per group along its rows, kept compact."""

    q: torch.Tensor
    scale: torch.Tensor  # [rows, groups]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        # float32 in, float32 out of the compiled graphs: inductor stops vectorising when bf16 and fp16
        # meet in one kernel (measured 5x slower with bf16 activations and fp16 GGUF scales)
        scale = self.scale.to(torch.float32)
        if x.shape[0] <= MATVEC_ROWS:  # a few tokens (most experts in a prefill chunk or a batch): row by row
            xf = x.to(torch.float32)
            return torch.cat([_matvec(xf[i:i + 1].contiguous(), self.q, scale) for i in range(x.shape[0])]).to(x.dtype)
        return F.linear(x, _expand(self.q, scale, torch.float32).to(x.dtype))


def warm_up(layers) -> int:
    """Compile the one-token kernel for every group-quantised matrix shape in these store layers now,
    at load, rather than inside the first token's time; returns how many shapes."""
    shapes = set()
    for info in layers:
        slots = {t.name: t for t in info.tensors}
        for name, t in slots.items():
            scale = slots.get(name[:-2] + ".scale") if name.endswith(".q") else None
            if scale is not None and "#" not in name and len(scale.shape) == 2:
                shapes.add((tuple(t.shape), t.dtype, tuple(scale.shape)))
    from .store import DTYPES

    with torch.inference_mode():
        for q_shape, q_dtype, s_shape in shapes:
            cols = q_shape[1] * (2 if q_dtype == "uint8" else 1)
            GroupedWeight(torch.zeros(q_shape, dtype=DTYPES[q_dtype]), torch.ones(s_shape)).linear(torch.zeros(1, cols))
    return len(shapes)
