"""`moestream convert`: a Hugging Face checkpoint into a store (see store.py), one expert at a time.

Where each checkpoint tensor goes is decided by transformers itself: its checkpoint conversion
mapping renames on-disk keys (`block_sparse_moe.experts.3.w1.weight`, ...) to the model's
parameter names and fuses per-expert tensors (`gate_proj` + `up_proj` -> `gate_up_proj`). We run
those same conversions on one expert's tensors at a time, so peak memory stays near one
expert plus one dense tensor, and the records hold exactly what transformers would compute with.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, rename_source_key

from . import __version__
from .native import NativeCheckpoint, e8m0
from .quant import SCHEMES, int8_linears, quantize, scheme_name
from .reader import CHECKSUM, checksum
from .safetensors_io import Checkpoint, write_safetensors
from .skeleton import UnsupportedModel, experts_modules, expert_params, layer_index, load_config, meta_model, quantization
from .stores import is_hub_id
from .store import ALIGN, DENSE_FILE, FORMAT, FORMAT_VERSION, STORE_JSON, LayerInfo, dtype_name, record_layout

EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]


def resolve_source(src: str, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a hub id downloaded (config, tokenizer, safetensors) by huggingface_hub."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise UnsupportedModel(f"{src}: expected a checkpoint directory or a hub id, found a file")
    if not is_hub_id(src):
        raise UnsupportedModel(f"{src}: no such directory, and not a hub id of the form org/name")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=src, revision=revision, allow_patterns=HUB_PATTERNS))


@dataclass
class _Group:
    """Checkpoint keys that together produce one or more model tensors (through one converter, or none)."""

    converter: WeightConverter | None
    target: str
    keys: list[tuple[str, str | None]] = field(default_factory=list)  # (source key, matched pattern)


@dataclass
class _ExpertPlan:
    module: str
    layer: int
    experts: int
    params: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # per-expert dtype and shape, by param name
    per_expert: dict[int, list[_Group]] = field(default_factory=dict)  # expert -> groups of per-expert keys
    fused: list[_Group] = field(default_factory=list)  # groups of 3-D keys holding all experts


def _run_groups(groups: list[_Group], fetch) -> dict[str, torch.Tensor]:
    """Materialise groups with `fetch(key)` and apply their converters; returns model-name -> tensor."""
    out = {}
    for g in groups:
        if g.converter is None:
            (key, _), = g.keys
            out[g.target] = fetch(key)
            continue
        conv = g.converter
        for pattern in conv.source_patterns:
            for key, p in g.keys:
                if p == pattern:
                    conv.add_tensor(g.target, key, pattern, fetch(key))
        out.update(conv.convert(g.target))
        conv.layer_targets.clear()
    return out


class _Plan:
    """Every checkpoint key assigned to the dense file or to an expert record, checked for completeness."""

    def __init__(self, model, ckpt: Checkpoint):
        experts = experts_modules(model)
        conversions = get_model_conversion_mapping(model)
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        renamings = [c for c in conversions if not isinstance(c, WeightConverter)]
        meta_sd = model.state_dict()
        expert_targets = {}
        self.experts: dict[str, _ExpertPlan] = {}
        for name, mod in experts.items():
            params = {p: (t.dtype, tuple(t.shape[1:])) for p, t in expert_params(mod).items()}
            n = {t.shape[0] for t in expert_params(mod).values()}
            self.experts[name] = _ExpertPlan(name, layer_index(name), n.pop(), params)
            expert_targets.update({f"{name}.{p}": name for p in params})

        dense: dict[tuple[int, str], _Group] = {}
        self.skipped: list[str] = []
        for key in ckpt.keys():
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
            conv = next((c for c in converters if pattern in c.source_patterns), None) if pattern else None
            module = expert_targets.get(target)
            if module is not None:
                plan = self.experts[module]
                m = EXPERT_INDEX.search(key)
                if m is None:
                    groups = plan.fused
                else:
                    e = int(m.group(1))
                    if not 0 <= e < plan.experts:
                        raise UnsupportedModel(f"{key}: expert {e} out of range ({plan.experts} experts in {module})")
                    groups = plan.per_expert.setdefault(e, [])
                g = next((g for g in groups if g.converter is conv and g.target == target), None)
                if g is None:
                    groups.append(g := _Group(conv, target))
                g.keys.append((key, pattern))
            elif target in meta_sd:
                g = dense.setdefault((id(conv), target), _Group(conv, target))
                g.keys.append((key, pattern))
            else:
                self.skipped.append(key)
        self.dense = list(dense.values())

        # Shapes of the dense outputs: run the converters on meta tensors.
        def meta_fetch(key):
            shape, dtype = ckpt.shape_dtype(key)
            return torch.empty(shape, dtype=dtype, device="meta")

        self.dense_specs = []
        for g in self.dense:
            for name, t in _run_groups([g], meta_fetch).items():
                want = tuple(meta_sd[name].shape) if name in meta_sd else None
                if want is not None and tuple(t.shape) != want:
                    raise UnsupportedModel(
                        f"checkpoint tensor {g.keys[0][0]} has shape {tuple(t.shape)}, "
                        f"but {type(model).__name__}.{name} needs {want}: config and weights disagree"
                    )
                self.dense_specs.append((name, t.dtype, tuple(t.shape)))

        produced = {n for n, _, _ in self.dense_specs}
        tied = getattr(model, "all_tied_weights_keys", {}) or {}
        missing = [k for k in meta_sd if k not in expert_targets and k not in produced and k not in tied]
        if missing:
            raise UnsupportedModel(
                f"{ckpt.root}: the checkpoint lacks {len(missing)} tensor(s) that {type(model).__name__} needs, "
                f"e.g. {', '.join(missing[:5])}"
            )
        for plan in self.experts.values():
            if not plan.fused and len(plan.per_expert) != plan.experts:
                raise UnsupportedModel(
                    f"{ckpt.root}: {plan.module} has tensors for {len(plan.per_expert)} of {plan.experts} experts"
                )


def _expert_tensors(plan: _ExpertPlan, e: int, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """One expert's slice of every parameter of the experts module, as transformers lays it out."""
    got = _run_groups(plan.per_expert.get(e, []), ckpt.get)
    got.update(_run_groups(plan.fused, lambda key: ckpt.get_rows(key, e, e + 1)))
    out = {}
    for p, (_, shape) in plan.params.items():
        full = f"{plan.module}.{p}"
        t = got.get(full)
        if t is None:
            raise UnsupportedModel(f"checkpoint has no tensor for {full} (expert {e})")
        if tuple(t.shape) == (1, *shape):
            t = t[0]
        if tuple(t.shape) != shape:
            raise UnsupportedModel(f"{full}, expert {e}: checkpoint gives shape {tuple(t.shape)}, model needs {shape}")
        out[p] = t
    return out


def _native_expert(plan: _ExpertPlan, e: int, ckpt: NativeCheckpoint) -> dict[str, torch.Tensor]:
    """One expert's record tensors with its quantised matrices kept as stored (native.py): a parameter made of
    several checkpoint matrices (gate and up) becomes row pieces `name#0`, `name#1`, joined after expansion.
    Only the converters that stack experts and concatenate rows are understood here; anything else that
    rearranges values would need the dequantised path."""
    pieces: dict[str, list[tuple[str, bool]]] = {}
    for fused, groups in ((False, plan.per_expert.get(e, [])), (True, plan.fused)):
        for g in groups:
            if g.converter is None:
                keys = [g.keys[0][0]]
            else:
                ops = g.converter.operations
                if fused or not all((isinstance(op, MergeModulelist) and op.dim == 0)
                                    or (isinstance(op, Concatenate) and op.dim == 1) for op in ops):
                    raise UnsupportedModel(f"{g.target}: transformers rearranges these expert weights "
                                           f"({', '.join(type(op).__name__ for op in ops)}); keeping their native "
                                           "format is not supported for this layout")
                keys = [k for pattern in g.converter.source_patterns for k, p in g.keys if p == pattern]
            pieces.setdefault(g.target.removeprefix(plan.module + "."), []).extend((k, fused) for k in keys)
    out = {}
    for param, (_, shape) in plan.params.items():
        keys = pieces.get(param)
        if not keys:
            raise UnsupportedModel(f"checkpoint has no tensor for {plan.module}.{param} (expert {e})")
        rows = 0
        for i, (key, fused) in enumerate(keys):
            name = param if len(keys) == 1 else f"{param}#{i}"
            q = ckpt.quantised(key)
            if q is not None:
                logical = q.shape[1:] if fused else q.shape
                out.update(ckpt.parts(q, e if fused else None, name))
            else:
                t = ckpt.get_rows(key, e, e + 1)[0] if fused else ckpt.get(key)
                logical = tuple(t.shape)
                out[name] = t
            if tuple(logical[1:]) != tuple(shape[1:]):
                raise UnsupportedModel(f"{key}: shape {tuple(logical)} does not fit {plan.module}.{param} {shape}")
            rows += logical[0]
        if rows != shape[0]:
            raise UnsupportedModel(f"{plan.module}.{param}, expert {e}: the checkpoint gives {rows} rows, "
                                   f"the model needs {shape[0]}")
    return out


def _stored(tensors: dict[str, torch.Tensor], scheme: str | None, group: int) -> dict[str, torch.Tensor]:
    """An expert's tensors as the record keeps them: as they are, or matrices quantised (quant.py)."""
    if scheme is None:
        return tensors
    out = {}
    for name, t in tensors.items():
        if t.dim() == 2:
            out.update({f"{name}.{k}": v for k, v in quantize(t, scheme, group).items()})
        else:
            out[name] = t
    return out


def write_layer(path: Path, layer: int, module: str, experts: int, tensors_of, bar: tqdm) -> LayerInfo:
    """One layer's expert file: record e holds `tensors_of(e)` (name -> tensor, as stored), all alike."""
    first = tensors_of(0)
    slots, record_bytes = record_layout([(p, t.dtype, tuple(t.shape)) for p, t in first.items()])
    sums = []
    record = torch.zeros(record_bytes, dtype=torch.uint8)
    with open(path, "wb") as f:
        for e in range(experts):
            tensors = first if e == 0 else tensors_of(e)
            record.zero_()
            for s in slots:
                t = tensors[s.name]
                if dtype_name(t.dtype) != s.dtype or tuple(t.shape) != s.shape:
                    raise UnsupportedModel(f"{module}.{s.name}: expert {e} is {t.dtype} {tuple(t.shape)}, expert 0 "
                                           f"is {s.dtype} {s.shape}")
                record[s.offset : s.offset + s.nbytes] = t.contiguous().view(-1).view(torch.uint8)
            data = record.numpy().data
            sums.append(checksum(data))
            f.write(data)
            bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
        f.flush()
        os.fsync(f.fileno())
    return LayerInfo(layer, module, str(path.relative_to(path.parent.parent)), experts, record_bytes, slots, sums)


def _partial_dirs(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.partial-*"))


def _remove_stale_partials(out: Path) -> None:
    """Temporary directories of conversions whose process is gone (killed, power loss)."""
    for d in _partial_dirs(out):
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def _store_dtype(specs) -> torch.dtype:
    """The dtype most dense bytes are in: what the runtime builds the model in."""
    by = {}
    for _, dtype, shape in specs:
        if dtype.is_floating_point:
            by[dtype] = by.get(dtype, 0) + dtype.itemsize * (torch.Size(shape).numel())
    return max(by, key=by.get) if by else torch.float32


def int8_dense_specs(specs: list, int8: set[str]) -> list:
    """The dense file's tensors with each weight named in `int8` replaced by its qweight and wscale."""
    out = []
    for name, dt, shape in specs:
        if name in int8:
            module = name.removesuffix(".weight")
            out += [(f"{module}.qweight", torch.int8, shape), (f"{module}.wscale", torch.bfloat16, shape[:1])]
        else:
            out.append((name, dt, shape))
    return out


def int8_dense_tensors(tensors, int8: set[str]):
    """(name, tensor) pairs with the weights named in `int8` quantised (LOSSY, opt-in: int8 per output channel)."""
    for name, t in tensors:
        if name in int8:
            p = quantize(t, "int8")
            yield f"{name.removesuffix('.weight')}.qweight", p["q"]
            yield f"{name.removesuffix('.weight')}.wscale", p["scale"]
        else:
            yield name, t


@contextlib.contextmanager
def store_directory(out: Path, force: bool):
    """A temporary sibling of `out` to write into, renamed to `out` when the block succeeds and removed
    when it fails: nothing half-written ever appears at `out`, and an existing `out` survives failures."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "experts").mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fp8_dense(model, plan: _Plan, ckpt) -> dict:
    """The dense nn.Linear weights `--dense fp8` keeps as stored: model name -> native.Quantised (fp8 only)."""
    out = {}
    for g in plan.dense:
        q = ckpt.quantised(g.keys[0][0]) if g.converter is None and isinstance(ckpt, NativeCheckpoint) else None
        if q is not None and q.kind == "fp8" and g.target.endswith(".weight") and \
                type(model.get_submodule(g.target.removesuffix(".weight"))) is torch.nn.Linear:
            out[g.target] = q
    return out


def _fp8_dense_specs(specs: list, fp8: dict) -> list:
    """The dense file's tensors with each weight kept in FP8 replaced by its `fp8` values and `fp8_scale`."""
    out = []
    for name, dt, shape in specs:
        if name in fp8:
            module, (bm, bn) = name.removesuffix(".weight"), fp8[name].block
            out += [(f"{module}.fp8", torch.float8_e4m3fn, shape),
                    (f"{module}.fp8_scale", torch.float32, (-(-shape[0] // bm), -(-shape[1] // bn)))]
        else:
            out.append((name, dt, shape))
    return out


def _quant_meta(plan: _Plan, ckpt, experts: str | None, group: int, int8: set, fp8: dict) -> dict:
    """store.json's `quant`: the experts' format, the dense part's, and for a quantised source what it was."""
    meta = {"experts": scheme_name(experts, group) if experts else "none", "dense": "int8_channel" if int8 else "none",
            "lossy": bool(experts or int8)}
    if fp8:
        meta["dense"] = ckpt.label({q.keys["values"] for q in fp8.values()})
    if isinstance(ckpt, NativeCheckpoint):
        expert_keys = {k for p in plan.experts.values() for groups in (*p.per_expert.values(), p.fused)
                       for g in groups for k, _ in g.keys}
        meta["experts"] = ckpt.label(expert_keys)
        dense = ckpt.label(set(ckpt.keys()) - expert_keys - {q.keys["values"] for q in fp8.values()})
        if dense != "none":
            meta["dense_source"] = f"{dense} dequantised to {dtype_name(ckpt.dtype)}"
    return meta


def write_meta(tmp: Path, *, source: dict, config, model, dtype: torch.dtype, quant: dict, dense_bytes: int,
               dense_tensors: int, layers: list[LayerInfo], seconds: float, skipped: list[str] = ()) -> None:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": f"moestream {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "dtype": dtype_name(dtype),
        "quant": quant,
        "alignment": ALIGN,
        "checksum": CHECKSUM,
        "dense": {"path": DENSE_FILE, "bytes": dense_bytes, "tensors": dense_tensors},
        "skipped_keys": list(skipped),
        "convert_seconds": round(seconds, 3),
        "layers": [i.to_json() for i in layers],
    }
    (tmp / STORE_JSON).write_text(json.dumps(meta, indent=1))


def convert(src: str, out: str | os.PathLike, *, force: bool = False, revision: str | None = None,
            progress: bool = True, experts: str | None = None, group: int = 32,
            dtype: torch.dtype | None = None, dense: str | None = None) -> Path:
    """Convert checkpoint `src` (directory, hub id or .gguf file) into a store at `out`; returns `out`.

    `experts` = 'int8' or 'int4' quantises the experts (lossy, opt-in); None keeps them as they are.
    `dtype`: the dense weights' dtype for a GGUF or quantised source (default bfloat16; float32 keeps them
    exact). A quantised checkpoint's experts keep their format (native.py); its dense part is dequantised.
    `dense` = 'int8' quantises the dense nn.Linear weights per output channel (lossy, opt-in).

    Nothing appears at `out` until the store is complete: everything is written into a
    temporary sibling directory that is renamed at the end, and removed on any failure.
    """
    out = Path(out).expanduser().absolute()
    if experts is not None and experts not in SCHEMES:
        raise ValueError(f"--experts {experts!r}: choose one of {', '.join(SCHEMES)}")
    if dense not in (None, "int8", "fp8"):
        raise ValueError(f"--dense {dense!r}: choose int8 (lossy) or fp8 (an FP8 checkpoint's dense weights kept "
                         "as stored)")
    if str(src).endswith(".gguf"):
        from .gguf_import import convert_gguf

        if experts is not None:
            raise ValueError("--experts: a GGUF file's experts keep their own quantisation (see `moestream inspect`)")
        if dense == "fp8":
            raise ValueError("--dense fp8 keeps an FP8 checkpoint's dense weights; a GGUF file has none")
        return convert_gguf(Path(src), out, force=force, progress=progress, dtype=dtype, dense=dense)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    src_dir = resolve_source(src, revision)
    config = load_config(str(src_dir))
    native = quantization(config) is not None
    if dtype is not None and not native:
        raise ValueError("--dtype applies to .gguf and quantised sources; a plain checkpoint keeps its dtype "
                         "(`run --dtype` sets the compute dtype)")
    if native and experts is not None:
        raise ValueError(f"--experts: {src} is quantised ({quantization(config)}); its experts keep their own format")
    model = meta_model(config)
    ckpt = Checkpoint(src_dir)
    if native:
        ckpt = NativeCheckpoint(ckpt, config, dtype or torch.bfloat16)
    plan = _Plan(model, ckpt)
    fp8 = _fp8_dense(model, plan, ckpt) if dense == "fp8" else {}
    if dense == "fp8" and not fp8:
        raise ValueError(f"--dense fp8 keeps an FP8 checkpoint's dense weights as stored; {src} has no FP8 linear "
                         "weights")
    t0 = time.time()
    skipped = set(plan.skipped)
    total = sum(ckpt.nbytes(k) for k in ckpt.keys() if k not in skipped)
    with store_directory(out, force) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {out.name}",
                                                  disable=not progress) as bar:

        int8 = {f"{n}.weight" for n in int8_linears(model)} if dense == "int8" else set()

        def dense_tensors():
            for g in plan.dense:
                if g.target in fp8:  # kept as stored: e4m3 values and float32 block scales
                    module, parts = g.target.removesuffix(".weight"), ckpt.parts(fp8[g.target], None)
                    values, scale = parts.pop("w.fp8"), parts.popitem()[1]
                    bar.update(values.numel() + scale.numel() * scale.element_size())
                    yield f"{module}.fp8", values
                    yield f"{module}.fp8_scale", e8m0(scale) if scale.dtype == torch.uint8 else scale
                    continue
                for name, t in _run_groups([g], ckpt.get).items():
                    bar.update(t.numel() * t.element_size())
                    yield name, t

        specs = int8_dense_specs(_fp8_dense_specs(plan.dense_specs, fp8), int8)
        dense_bytes = write_safetensors(tmp / DENSE_FILE, specs, int8_dense_tensors(dense_tensors(), int8),
                                        {"format": "pt", "producer": f"moestream {__version__}"})
        layers = []
        for module in sorted(plan.experts, key=lambda m: plan.experts[m].layer):
            p = plan.experts[module]
            if native:
                records = lambda e, p=p: _native_expert(p, e, ckpt)
            else:
                records = lambda e, p=p: _stored(_expert_tensors(p, e, ckpt), experts, group)
            layers.append(write_layer(tmp / "experts" / f"layer-{p.layer:03d}.bin", p.layer, module, p.experts,
                                      records, bar))
        for f in sorted(src_dir.iterdir()):
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        if native:  # the store's dense part is dequantised: its config must not say otherwise
            cfg = json.loads((tmp / "config.json").read_text())
            cfg.pop("quantization_config", None)
            cfg.get("text_config", {}).pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        write_meta(tmp, source={"model": str(src), "path": str(src_dir), "revision": revision, "files": ckpt.files()},
                   config=config, model=model, dtype=_store_dtype(plan.dense_specs),
                   quant=_quant_meta(plan, ckpt, experts, group, int8, fp8),
                   dense_bytes=dense_bytes, dense_tensors=len(specs), layers=layers,
                   seconds=time.time() - t0, skipped=plan.skipped)
    return out
