"""llama.cpp's K-quants (Q4_K, Q5_K, Q6_K) in torch: dequantised, and multiplied without expanding.

GGUF imports keep K-quant experts as llama.cpp's own blocks (256 values each). The gguf package
dequantises them in numpy (~20 ms per Qwen3-30B-sized expert, benchmarks/bench_kernels.py). Here
the same arithmetic, in the same float32 operation order (so the values are bit for bit gguf-py's),
is written as torch element-wise ops; `matvec` lets torch.compile fuse it into the dot product, so
one token reads the blocks once and never materialises the matrix.
"""

from __future__ import annotations

import torch

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes (last dim) as float16, to float32."""
    bits = b[..., 0].to(torch.int32) | (b[..., 1].to(torch.int32) << 8)
    return torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(torch.float16).to(torch.float32)


def _scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6-bit scales and mins of 8 sub-blocks, packed in 12 bytes ([..., 12] -> two [..., 8])."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _halves(q: torch.Tensor) -> torch.Tensor:
    """[..., n, k] bytes -> [..., n, 2, k]: low nibbles, then high nibbles."""
    return torch.stack([q & 0x0F, q >> 4], dim=-2)


def dequantize(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """[rows, bytes] uint8 of `type_name` blocks -> [rows, cols] float32, as gguf-py computes it."""
    rows = blocks.shape[0]
    b = blocks.view(rows, -1, BLOCK_BYTES[type_name])
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _scale_min(b[..., 4:16])
        scale = (d[..., None] * sc)[..., None]  # [rows, nb, 8, 1]
        minus = (dmin[..., None] * mn)[..., None]
        if type_name == "Q4_K":
            q = _halves(b[..., 16:144].reshape(rows, -1, 4, 32)).reshape(rows, -1, 8, 32)
        else:
            ql = _halves(b[..., 48:176].reshape(rows, -1, 4, 32)).reshape(rows, -1, 8, 32)
            qh = b[..., 16:48].reshape(rows, -1, 1, 32)
            bits = torch.stack([(qh >> i) & 1 for i in range(8)], dim=-2).reshape(rows, -1, 8, 32)
            q = ql | (bits << 4)
        return (scale * q.to(torch.float32) - minus).reshape(rows, -1)
    if type_name == "Q6_K":
        ql, qh, sc = b[..., 0:128], b[..., 128:192], b[..., 192:208]
        d = _f16(b[..., 208:210])
        scale = (d[..., None] * sc.view(torch.int8).to(torch.float32)).reshape(rows, -1, 16, 1)
        low = _halves(ql.reshape(rows, -1, 2, 64)).reshape(rows, -1, 2, 4, 32)  # half, (nibble, part), 32
        high = qh.reshape(rows, -1, 2, 32)
        high = torch.stack([(high >> s) & 3 for s in (0, 2, 4, 6)], dim=-2)  # half, shift = 2 nibble + part, 32
        q = ((low | (high << 4)).to(torch.int32) - 32).to(torch.float32).reshape(rows, -1, 16, 16)
        return (scale * q).reshape(rows, -1)
    raise ValueError(f"{type_name}: not a K-quant this module computes ({', '.join(BLOCK_BYTES)})")


def scales(blocks: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-block float32 scales and mins of [rows, bytes] blocks, [rows, sub-blocks]: 8 per block of 256
    (Q6_K: 16 per block, mins zero)."""
    rows = blocks.shape[0]
    b = blocks.view(rows, -1, BLOCK_BYTES[type_name])
    if type_name == "Q6_K":
        s = _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(torch.int8).to(torch.float32)
        return s.reshape(rows, -1), torch.zeros_like(s).reshape(rows, -1)
    sc, mn = _scale_min(b[..., 4:16])
    return (_f16(b[..., 0:2])[..., None] * sc).reshape(rows, -1), (_f16(b[..., 2:4])[..., None] * mn).reshape(rows, -1)


def matvec(x: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor, minus: torch.Tensor,
           type_name: str) -> torch.Tensor:
    """x [1, cols] times the matrix transposed: [1, rows], summed in float32, without expanding the matrix:
    each byte's nibbles meet the stretches of x they belong to, scales per sub-block, and the mins enter
    once per sub-block as min * sum(x) (for torch.compile to fuse; `scale`, `minus` from `scales`)."""
    rows = blocks.shape[0]
    b = blocks.view(rows, -1, BLOCK_BYTES[type_name])
    xf = x.to(torch.float32)
    if type_name in ("Q4_K", "Q5_K"):
        xv = xf.view(1, -1, 4, 2, 32)  # block, byte chunk, nibble, 32
        qs = (b[..., 16:144] if type_name == "Q4_K" else b[..., 48:176]).reshape(rows, -1, 4, 32)
        lo, hi = (qs & 0x0F).to(torch.int32), (qs >> 4).to(torch.int32)
        if type_name == "Q5_K":  # the fifth bit of sub-block j is bit j of qh
            qh = b[..., 16:48].reshape(rows, -1, 1, 32).to(torch.int32)
            shift = torch.arange(0, 8, 2, device=b.device).view(1, 1, 4, 1)
            lo = lo | (((qh >> shift) & 1) << 4)
            hi = hi | (((qh >> (shift + 1)) & 1) << 4)
        s = scale.view(rows, -1, 4, 2, 1)
        terms = s[..., 0, :] * lo.to(torch.float32) * xv[..., 0, :] + s[..., 1, :] * hi.to(torch.float32) * xv[..., 1, :]
        return (terms.sum((1, 2, 3)) - (minus.view(rows, -1, 4, 2) * xv.sum(-1)).sum((1, 2, 3))).view(1, -1)
    # Q6_K: per 128-value half, ql bytes 0..63 hold (nibble 0: values 0..63, nibble 1: 64..127) low bits,
    # qh byte l holds the high 2 bits of values l, l+32, l+64, l+96
    ql = b[..., 0:128].reshape(rows, -1, 2, 2, 32).to(torch.int32)  # half, part, 32
    qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32).to(torch.int32)
    xv = xf.view(1, -1, 2, 2, 2, 32)  # block, half, nibble, part, 32
    s = scale.view(rows, -1, 2, 2, 2, 2, 1)  # half, nibble, part, 16-value group, 1
    parts = torch.arange(2, device=b.device).view(1, 1, 1, 2, 1)
    total = 0
    for nib in (0, 1):
        low = (ql >> (4 * nib)) & 0x0F
        high = (qh >> (4 * nib + 2 * parts)) & 3
        q = ((low | (high << 4)) - 32).to(torch.float32).view(rows, -1, 2, 2, 2, 16)
        total = total + (s[:, :, :, nib] * q * xv[:, :, :, nib].reshape(1, -1, 2, 2, 2, 16)).sum((1, 2, 3, 4, 5))
    return total.view(1, -1)
