"""Reading sharded safetensors checkpoints lazily, reading a file straight into allocated tensors, and
writing a safetensors file one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once; the dense part of a large
model is too big for that, so we write the (simple) format ourselves: an 8-byte header length,
a JSON header with each tensor's dtype, shape and byte range, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class CheckpointError(Exception):
    """A source checkpoint that is missing files or tensors."""


class Checkpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint, opened lazily by key."""

    def __init__(self, root: Path):
        self.root = Path(root)
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.root.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.root}: no safetensors weights (model.safetensors or an index) found")
            weight_map = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}
        for name in sorted(set(weight_map.values())):
            if not (self.root / name).is_file():
                raise CheckpointError(f"{self.root / name}: shard named in the index is missing")

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def files(self) -> dict[str, int]:
        return {n: (self.root / n).stat().st_size for n in sorted(set(self.weight_map.values()))}

    def _handle(self, key: str):
        name = self.weight_map[key]
        h = self._handles.get(name)
        if h is None:
            h = self._handles[name] = safe_open(self.root / name, "pt")
        return h

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        s = self._handle(key).get_slice(key)
        return tuple(s.get_shape()), ST_DTYPES[s.get_dtype()]

    def nbytes(self, key: str) -> int:
        shape, dtype = self.shape_dtype(key)
        return dtype.itemsize * torch.Size(shape).numel()

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the first dimension, read without loading the rest."""
        return self._handle(key).get_slice(key)[start:stop]


def write_safetensors(
    path: Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write tensors (yielded in the order of `specs`) to `path`; returns bytes of tensor data."""
    header: dict = {"__metadata__": metadata or {}}
    offset = 0
    for name, dtype, shape in specs:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    expected = iter(specs)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in tensors:
            want = next(expected)
            if (name, t.dtype, tuple(t.shape)) != want:
                raise ValueError(f"{path}: tensor {name} {t.dtype} {tuple(t.shape)} does not match header {want}")
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        if next(expected, None) is not None:
            raise ValueError(f"{path}: fewer tensors written than declared in the header")
        f.flush()
        os.fsync(f.fileno())
    return offset


READ_CHUNK = 64 * 2**20  # bytes staged at once when a tensor must be converted or moved to a device


def read_into(path: Path, target: Callable[[str, torch.dtype, tuple[int, ...]], torch.Tensor]) -> list[str]:
    """Fill, tensor by tensor, the tensor `target(name, dtype, shape)` returns, reading `path` with
    plain reads: straight into the destination when it is a contiguous CPU tensor of the stored dtype,
    else through one staging chunk of at most READ_CHUNK bytes. No mmap (whose touched pages would count
    in the resident set next to the copy, doubling the dense weights at load) and no page cache left
    behind. Returns the names read, in file order."""
    names = []
    with open(path, "rb") as f:
        fd = f.fileno()
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                 key=lambda kv: kv[1]["data_offsets"][0]):
            dtype, shape = ST_DTYPES[info["dtype"]], tuple(info["shape"])
            start, stop = info["data_offsets"]
            dst = target(name, dtype, shape)
            if dst.dtype == dtype and dst.device.type == "cpu" and dst.is_contiguous():
                _pread_exact(fd, dst.view(-1).view(torch.uint8).numpy(), base + start, path, name)
            else:  # convert or move in chunks of whole elements
                flat, step = dst.view(-1), max(1, READ_CHUNK // dtype.itemsize)
                buf = torch.empty(min(step, flat.numel()) * dtype.itemsize, dtype=torch.uint8)
                for i in range(0, flat.numel(), step):
                    k = min(step, flat.numel() - i)
                    chunk = buf[: k * dtype.itemsize]
                    _pread_exact(fd, chunk.numpy(), base + start + i * dtype.itemsize, path, name)
                    flat[i : i + k].copy_(chunk.view(dtype))
            names.append(name)
        if hasattr(os, "posix_fadvise"):  # not on macOS
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return names


def _pread_exact(fd: int, out, offset: int, path: Path, name: str) -> None:
    view, done = memoryview(out).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"{path}: file ends inside tensor {name}")
        done += got
