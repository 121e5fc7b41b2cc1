"""The on-disk store: what `convert` writes and the runtime reads.

A store directory holds the model's config and tokenizer files, `dense.safetensors`
(every non-expert tensor, already under the transformers model's parameter names),
`experts/layer-NNN.bin` (one 4 KiB-aligned record per expert, expert e at
`e * record_bytes`) and `store.json`, which describes all of it. A record holds one
expert's slice of every parameter of the layer's `*Experts` module, in the module's
own layout, so the runtime computes with it exactly as transformers would.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "moestream-store"
FORMAT_VERSION = 1
ALIGN = 4096
STORE_JSON = "store.json"
DENSE_FILE = "dense.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,  # quantised experts (quant.py)
    "uint8": torch.uint8,
    "float8_e4m3fn": torch.float8_e4m3fn,  # native fp8 experts (native.py)
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not supported in stores yet (supported: {', '.join(DTYPES)})")


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class TensorSlot:
    """Where one parameter's per-expert slice lives inside a record."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass
class LayerInfo:
    """One MoE layer's expert file: E records of `record_bytes` each."""

    layer: int
    module: str
    path: str
    experts: int
    record_bytes: int
    tensors: list[TensorSlot]
    checksums: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "layer": self.layer,
            "module": self.module,
            "path": self.path,
            "experts": self.experts,
            "record_bytes": self.record_bytes,
            "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset} for t in self.tensors
            ],
            "checksums": self.checksums,
        }

    @classmethod
    def from_json(cls, d: dict) -> LayerInfo:
        return cls(
            layer=d["layer"],
            module=d["module"],
            path=d["path"],
            experts=d["experts"],
            record_bytes=d["record_bytes"],
            tensors=[TensorSlot(t["name"], t["dtype"], tuple(t["shape"]), t["offset"]) for t in d["tensors"]],
            checksums=list(d.get("checksums", [])),
        )


def record_layout(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[list[TensorSlot], int]:
    """Pack per-expert tensors side by side (64-byte aligned each) into one 4 KiB-aligned record."""
    slots, offset = [], 0
    for name, dtype, shape in specs:
        slot = TensorSlot(name, dtype_name(dtype), tuple(int(s) for s in shape), offset)
        slots.append(slot)
        offset = align_up(offset + slot.nbytes, 64)
    return slots, align_up(max(offset, 1))


def record_tensors(buf: torch.Tensor, slots: list[TensorSlot]) -> dict[str, torch.Tensor]:
    """Views (no copy) of each parameter inside a record buffer of dtype uint8."""
    out = {}
    for s in slots:
        raw = buf[s.offset : s.offset + s.nbytes]
        out[s.name] = raw.view(DTYPES[s.dtype]).view(s.shape)
    return out


class StoreError(Exception):
    """A store that is missing, incomplete, of another format version, or corrupt."""


@dataclass
class Store:
    """An opened store directory (metadata only; no weights are read here)."""

    root: Path
    meta: dict
    layers: list[LayerInfo]

    @classmethod
    def open(cls, root: str | os.PathLike) -> Store:
        root = Path(root)
        path = root / STORE_JSON
        if not path.is_file():
            raise StoreError(f"{root} is not a moestream store: {STORE_JSON} is missing")
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{path} is not valid JSON: {e}") from e
        if meta.get("format") != FORMAT:
            raise StoreError(f"{path}: not a moestream store (format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format version {meta.get('format_version')} is not supported by this moestream "
                f"(which reads version {FORMAT_VERSION}); convert the model again"
            )
        layers = [LayerInfo.from_json(d) for d in meta["layers"]]
        for info in layers:
            f = root / info.path
            want = info.experts * info.record_bytes
            if not f.is_file() or f.stat().st_size != want:
                have = f.stat().st_size if f.is_file() else "missing"
                raise StoreError(f"{f}: expert file should hold {want} bytes, found {have}")
        return cls(root, meta, layers)

    @property
    def dense_path(self) -> Path:
        return self.root / self.meta["dense"]["path"]

    @property
    def dense_bytes(self) -> int:
        return int(self.meta["dense"]["bytes"])

    @property
    def expert_bytes(self) -> int:
        return sum(i.experts * i.record_bytes for i in self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.meta["dtype"]]

    def layer_by_module(self) -> dict[str, LayerInfo]:
        return {i.module: i for i in self.layers}
