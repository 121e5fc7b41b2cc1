"""Checkpoints that ship quantised, read in their native formats.

  fp8    e4m3 values with one scale per block (DeepSeek-V3/R1, Kimi K2: fp32 `weight_scale_inv` per 128x128;
         DeepSeek V4 dense: E8M0 `scale`). Upstream's rule: element (i, j) uses scale[i // bm, j // bn], the
         edge blocks partial (a 576-row weight has 5 block rows).
  fp4    e2m1 values, two per byte (even element in the low nibble), one E8M0 scale (2 ** (byte - 127)) per
         32 values along the row: DeepSeek V4's experts (I8 [N, K/2] + `scale`) and GPT-OSS's MXFP4
         (`*_blocks` [E, N, K/32, 16] + `*_scales`; transformers' parameter is the transpose).
  int4   compressed-tensors pack-quantized (Kimi K2 Thinking / K2.5): eight 4-bit values per int32, low bits
         first, stored +8; symmetric, one bf16 scale per group along the row. Viewed as bytes this is exactly
         quant.py's int4 layout, so it is kept as `name.q` + `name.scale`, byte for byte.

`NativeCheckpoint` shows such a checkpoint as the plain one it stands for (one logical key per matrix,
scales hidden, `get` dequantises: what the dense part is written from) and hands out each matrix's
stored parts (`parts`), which expert records keep as they are: `name.fp8` + `name.fp8_scale{bm}x{bn}`,
`name.fp4` + `name.fp4_scale`, `name.q` + `name.scale`. Stored parts are always [out, in], as upstream
stores them; `dequantize_part` expands them one expert at a time at use (or `grouped_part` keeps them
compact for the compiled kernels). `Fp8Linear` keeps an FP8 checkpoint's dense linears as stored
(`convert --dense fp8`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from .safetensors_io import Checkpoint
from .skeleton import UnsupportedModel, check_weights_supported, quantization

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_GROUP = 32
_BYTE_PAIRS: dict[torch.device, torch.Tensor] = {}


def e8m0(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 exponents (uint8 or float8_e8m0fnu) as float32 powers of two."""
    return torch.exp2(scale.view(torch.uint8).to(torch.float32) - 127)


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """e4m3 [R, C] times its block scales (fp32, or E8M0 as uint8), edge blocks partial, in float32."""
    rows, cols = values.shape
    s = e8m0(scale) if scale.dtype in (torch.uint8, torch.float8_e8m0fnu) else scale.to(torch.float32)
    s = s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return values.to(torch.float32) * s


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e2m1 pairs [R, C/2] (low nibble first) times one E8M0 scale per 32 values [R, C/32], in float32."""
    table = _BYTE_PAIRS.get(packed.device)
    if table is None:
        lut = torch.tensor(E2M1, dtype=torch.float32)
        byte = torch.arange(256)
        table = _BYTE_PAIRS[packed.device] = torch.stack([lut[byte & 15], lut[byte >> 4]], -1).to(packed.device)
    rows = packed.shape[0]
    vals = table[packed.view(torch.uint8).long()].view(rows, -1, FP4_GROUP)
    return (vals * e8m0(scale)[:, :, None]).view(rows, -1)


def dequantize_part(base: str, parts: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The float32 [out, in] matrix `base` from its fp8/fp4 parts in `parts`, or None if it has none."""
    if base + ".fp4" in parts:
        return dequantize_fp4(parts[base + ".fp4"], parts[base + ".fp4_scale"])
    if base + ".fp8" in parts:
        (name, scale), = ((n, t) for n, t in parts.items() if n.startswith(base + ".fp8_scale"))
        bm, bn = name.removeprefix(base + ".fp8_scale").split("x")
        return dequantize_fp8(parts[base + ".fp8"], scale, (int(bm), int(bn)))
    return None


def native_formats(config: PretrainedConfig) -> tuple[str, str]:
    """(experts, dense) formats a checkpoint ships in, from its config alone (plan.py's names)."""
    method = quantization(config)
    if method is None:
        return "bf16", "bf16"
    q = config.quantization_config
    q = q if isinstance(q, dict) else q.to_dict()
    if method == "fp8":
        return ("fp4" if q.get("expert_dtype") == "fp4" else "fp8"), "fp8"
    if method == "mxfp4":
        return "mxfp4", "bf16"
    if method == "compressed-tensors":
        return "int4", "bf16"
    return method, "bf16"


def grouped_part(base: str, parts: dict[str, torch.Tensor]):
    """The fp8/fp4 matrix `base` as a compact kernels.GroupedWeight (one float32 scale per row and group along
    it: FP8's block scales repeated down their block's rows), or None where that form does not fit."""
    from .kernels import GroupedWeight

    if base + ".fp4" in parts:
        return GroupedWeight(parts[base + ".fp4"], e8m0(parts[base + ".fp4_scale"]), "e2m1")
    if base + ".fp8" in parts:
        (name, scale), = ((n, t) for n, t in parts.items() if n.startswith(base + ".fp8_scale"))
        bm, bn = (int(b) for b in name.removeprefix(base + ".fp8_scale").split("x"))
        values = parts[base + ".fp8"]
        if values.shape[1] % bn:
            return None
        scale = e8m0(scale) if scale.dtype in (torch.uint8, torch.float8_e8m0fnu) else scale.to(torch.float32)
        return GroupedWeight(values, scale.repeat_interleave(bm, 0)[:values.shape[0]], "e4m3")
    return None


def is_scale_part(name: str) -> bool:
    """Scales and zero points: parts that are not values of their own."""
    return name.endswith((".scale", ".fp4_scale", ".zero")) or ".fp8_scale" in name


@dataclass(frozen=True)
class Quantised:
    """One quantised matrix of the checkpoint: its parts' keys, and the matrix it stands for."""

    kind: str  # fp8 | fp4 | int4
    keys: dict[str, str]  # part (values, scale) -> checkpoint key
    shape: tuple[int, ...]  # the logical shape transformers' parameter has
    block: tuple[int, int] | None = None  # fp8
    transposed: bool = False  # logical = stored matrix transposed (GPT-OSS)


class NativeCheckpoint:
    """A quantised checkpoint seen as the plain one it stands for (see the module docstring).

    `dtype` is what `get` dequantises into (the dense part's dtype)."""

    def __init__(self, ckpt: Checkpoint, config: PretrainedConfig, dtype: torch.dtype):
        self.ckpt, self.dtype = ckpt, dtype
        self.method = quantization(config)
        q = config.quantization_config
        q = q if isinstance(q, dict) else q.to_dict()
        self.matrices: dict[str, Quantised] = {}
        keys = set(ckpt.keys())
        if self.method == "fp8":
            self._find_fp8(keys, q)
        elif self.method == "mxfp4":
            self._find_mxfp4(keys)
        elif self.method == "compressed-tensors":
            self._find_int4(keys, q)
        else:
            check_weights_supported(config, str(ckpt.root))
        if not self.matrices:
            raise UnsupportedModel(f"{ckpt.root}: config.json says {self.method}, but no quantised tensor was found")
        hidden = {k for m in self.matrices.values() for k in m.keys.values()}
        self._plain = [k for k in ckpt.keys() if k not in hidden]
        self.root = ckpt.root

    def _shape(self, key: str) -> tuple[int, ...]:
        return self.ckpt.shape_dtype(key)[0]

    def _find_fp8(self, keys: set[str], q: dict) -> None:
        block = tuple(q.get("weight_block_size") or ())
        if len(block) != 2:
            raise UnsupportedModel(f"{self.ckpt.root}: fp8 without a 2-D weight_block_size ({block}) is not supported "
                                   "(per-tensor and per-channel FP8 are not read yet)")
        for k in sorted(keys):
            if not k.endswith(".weight"):
                continue
            base = k.removesuffix(".weight")
            scale = next((s for s in (k + "_scale_inv", base + ".scale", k + "_scale") if s in keys), None)
            if scale is None:
                continue
            (rows, cols), dtype = self.ckpt.shape_dtype(k)
            sshape = self._shape(scale)
            if dtype == torch.float8_e4m3fn:
                want = (-(-rows // block[0]), -(-cols // block[1]))
                if tuple(sshape) != want:
                    raise UnsupportedModel(f"{scale}: scale grid {tuple(sshape)} does not fit {k} [{rows}, {cols}] "
                                           f"in {block[0]}x{block[1]} blocks (want {want})")
                self.matrices[k] = Quantised("fp8", {"values": k, "scale": scale}, (rows, cols), block)
            elif dtype in (torch.int8, torch.uint8):
                if tuple(sshape) != (rows, cols * 2 // FP4_GROUP):
                    raise UnsupportedModel(f"{scale}: {tuple(sshape)} is not one E8M0 scale per {FP4_GROUP} fp4 "
                                           f"values of {k} [{rows}, {cols * 2}]")
                self.matrices[k] = Quantised("fp4", {"values": k, "scale": scale}, (rows, cols * 2))
            else:
                raise UnsupportedModel(f"{k}: {dtype} weight with a block scale; expected float8_e4m3fn or packed fp4")

    def _find_mxfp4(self, keys: set[str]) -> None:
        for k in sorted(keys):
            if not k.endswith("_blocks"):
                continue
            base = k.removesuffix("_blocks")
            if base + "_scales" not in keys:
                raise UnsupportedModel(f"{k}: MXFP4 blocks without {base}_scales")
            *lead, rows, groups, size = self._shape(k)
            if size * 2 != FP4_GROUP or tuple(self._shape(base + "_scales")) != (*lead, rows, groups):
                raise UnsupportedModel(f"{k}: MXFP4 blocks {self._shape(k)} and scales "
                                       f"{self._shape(base + '_scales')} do not match")
            self.matrices[base] = Quantised("fp4", {"values": k, "scale": base + "_scales"},
                                            (*lead, groups * FP4_GROUP, rows), transposed=True)

    def _find_int4(self, keys: set[str], q: dict) -> None:
        fmt = q.get("format")
        for name, group in (q.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            ok = (w.get("num_bits"), w.get("type"), w.get("symmetric"), w.get("strategy")) == (4, "int", True, "group")
            if fmt != "pack-quantized" or not ok or group.get("input_activations"):
                raise UnsupportedModel(
                    f"{self.ckpt.root}: compressed-tensors {fmt} group {name} ({w}) is not supported; moestream reads "
                    "pack-quantized, symmetric, group-wise int4 weights without activation quantisation")
        for k in sorted(keys):
            if not k.endswith(".weight_packed"):
                continue
            base = k.removesuffix(".weight_packed")
            if base + ".weight_zero_point" in keys:
                raise UnsupportedModel(f"{base}: asymmetric (zero-point) int4 is not supported")
            rows, cols = self.ckpt.get(base + ".weight_shape").tolist()
            srows, groups = self._shape(base + ".weight_scale")
            if self._shape(k) != (rows, cols // 8) or srows != rows or cols % groups or (cols // groups) % 2:
                raise UnsupportedModel(f"{k}: packed {self._shape(k)} and scales {(srows, groups)} do not fit "
                                       f"weight_shape {(rows, cols)}")
            self.matrices[base + ".weight"] = Quantised(
                "int4", {"values": k, "scale": base + ".weight_scale", "shape": base + ".weight_shape"}, (rows, cols))

    def label(self, keys) -> str:
        """The formats of the quantised matrices among `keys`, e.g. 'fp8_e4m3_b128x128', or 'none'."""
        labels = set()
        for m in (self.matrices[k] for k in keys if k in self.matrices):
            if m.kind == "fp8":
                labels.add(f"fp8_e4m3_b{m.block[0]}x{m.block[1]}")
            elif m.kind == "fp4":
                labels.add(f"fp4_e2m1_g{FP4_GROUP}")
            else:
                labels.add(f"int4_g{m.shape[1] // self._shape(m.keys['scale'])[1]}")
        return " + ".join(sorted(labels)) or "none"

    def keys(self) -> list[str]:
        return self._plain + list(self.matrices)

    def files(self) -> dict[str, int]:
        return self.ckpt.files()

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        m = self.matrices.get(key)
        return (m.shape, self.dtype) if m else self.ckpt.shape_dtype(key)

    def nbytes(self, key: str) -> int:
        m = self.matrices.get(key)
        return sum(self.ckpt.nbytes(k) for k in m.keys.values()) if m else self.ckpt.nbytes(key)

    def get(self, key: str) -> torch.Tensor:
        m = self.matrices.get(key)
        return self._dequantized(m, None) if m else self.ckpt.get(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        m = self.matrices.get(key)
        return self._dequantized(m, (start, stop)) if m else self.ckpt.get_rows(key, start, stop)

    def _dequantized(self, m: Quantised, rows: tuple[int, int] | None) -> torch.Tensor:
        mats = [self.parts(m, e) for e in range(*rows)] if rows else [self.parts(m, None)]
        out = []
        for parts in mats:
            w = dequantize_part("w", parts)
            if w is None:  # int4
                from .quant import dequantize

                w = dequantize(parts["w.q"], parts["w.scale"], torch.float32)
            out.append(w.T if m.transposed else w)
        return (torch.stack(out) if rows else out[0]).to(self.dtype)

    def quantised(self, key: str) -> Quantised | None:
        return self.matrices.get(key)

    def parts(self, m: Quantised, expert: int | None, name: str = "w") -> dict[str, torch.Tensor]:
        """The matrix's stored parts, named as a record keeps them (`name.fp8`, ...); `expert` picks one
        slice of a matrix that holds every expert (GPT-OSS)."""
        def get(part):
            key = m.keys[part]
            return self.ckpt.get(key) if expert is None else self.ckpt.get_rows(key, expert, expert + 1)[0]

        values, scale = get("values"), get("scale")
        if m.kind == "fp8":
            scale = scale.view(torch.uint8) if scale.dtype == torch.float8_e8m0fnu else scale.to(torch.float32)
            return {f"{name}.fp8": values, f"{name}.fp8_scale{m.block[0]}x{m.block[1]}": scale}
        if m.kind == "fp4":
            return {f"{name}.fp4": values.reshape(values.shape[0], -1).view(torch.uint8),
                    f"{name}.fp4_scale": scale.reshape(scale.shape[0], -1).view(torch.uint8)}
        return {f"{name}.q": values.contiguous().view(torch.uint8), f"{name}.scale": scale}


class Fp8Linear(torch.nn.Module):
    """An nn.Linear whose weight stays in the checkpoint's FP8 (`--dense fp8`): e4m3 values `fp8` and float32
    block scales `fp8_scale`, half the resident bytes of bf16 (a DeepSeek-sized dense part in 32-64 GB).
    Computed by the compiled e4m3 kernel on CPU (kernels.GroupedWeight), dequantised per call elsewhere."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 block: tuple[int, int], device=None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        grid = (-(-out_features // block[0]), -(-in_features // block[1]))
        self.register_buffer("fp8", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("fp8_scale", torch.empty(grid, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = {"w.fp8": self.fp8, f"w.fp8_scale{self.block[0]}x{self.block[1]}": self.fp8_scale}
        flat = x.reshape(-1, self.in_features)
        w = grouped_part("w", parts) if flat.device.type == "cpu" else None
        y = w.linear(flat) if w is not None else F.linear(flat, dequantize_part("w", parts).to(x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y
