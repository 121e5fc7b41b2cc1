"""Hand-written AVX-512 kernels: 4-bit group-quantised matrices and whole experts, llama.cpp's Q4_K, Q5_K and
Q6_K blocks (for a few tokens, token by token), one-token dense half-precision matrices, and the small steps of
a decode token that cost more in torch's per-op overhead than in arithmetic: one query's attention
(attention.py), RMSNorm (kernels.use_c_norms), the experts' weighted sum (ckernels.c). Opt-in and lossy:
experts with int8-rounded activations (`record_mlp(int8=True)`, load(activations="int8")).

torch.compile's fused int4 matvec reaches ~15 G weights/s on this project's 2-core machines; the
C kernels here do an expert in about half its time (benchmarks/bench_kernels.py), which is most of a
resident decode token, and a dense matvec without the ~20-40 us of guards and wrappers each compiled
call costs. They are built at first use with the machine's C compiler (`$CC`, else
`cc`) into a cache folder (`$MOESTREAM_CACHE`, else ~/.cache/moestream) keyed by source, flags and
CPU, and loaded with ctypes. Where there is no AVX-512, no compiler, or the build fails, `available()`
is False and kernels.py computes the same products with its compiled torch kernels (a failed
build is reported once).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .kquants import BLOCK_BYTES, QK_K

SOURCE = Path(__file__).with_name("ckernels.c")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # also the dtypes attend_one reads
# value of each 4-bit code: int4 (code - 8), e2m1 (sign, 2 exponent bits, 1 mantissa bit)
TABLES = {"int4": torch.arange(-8, 8, dtype=torch.float32),
          "e2m1": torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])}

_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_key() -> str:
    """The CPU's identity for the cache key: -march=native code is only valid where it was built."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith("flags")), info[:4096])
    except OSError:
        import platform

        return platform.processor()


def _build() -> Path:
    """The shared library, compiled now unless the cache holds it (written to a temporary name and
    renamed, so concurrent builds never load a half-written file)."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOESTREAM_CACHE", Path.home() / ".cache" / "moestream"))
    lib = root / "kernels" / f"ckernels-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True, text=True)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def _x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if not _x86():  # AVX-512 only: elsewhere nothing to build
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip().splitlines()[0] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        print(f"note: C kernels unavailable, using the compiled torch ones ({detail})", file=sys.stderr)
        return None
    if not lib.ckernels_available():  # built without AVX-512: nothing to gain over torch's kernels
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.ckernels_group_ok.argtypes = [i]
    lib.ckernels_matvec.argtypes = [p, p, i, i, i, i, p, p, i, p, i]
    lib.ckernels_matvec.restype = i
    lib.ckernels_silu_mlp.argtypes = [p, p, i, i, p, p, i, i, i, i, p, p, i, p, i]
    lib.ckernels_silu_mlp.restype = i
    lib.ckernels_dense_matvec.argtypes = [p, i, i, i, p, p, i, i]
    lib.ckernels_dense_matvec.restype = i
    lib.ckernels_router_guess.argtypes = [p, p, p, i, i, i, i, p, i]
    lib.ckernels_router_guess.restype = i
    lib.ckernels_kquant_matvec.argtypes = [p, i, i, i, p, i, p, i]
    lib.ckernels_kquant_matvec.restype = i
    lib.ckernels_q8_ok.argtypes = [i, i]
    lib.ckernels_experts_one.argtypes = [p, i, i, i, i, i, i, i, p, i, p, i]
    lib.ckernels_experts_one.restype = i
    lib.ckernels_attend_one.argtypes = [p, p, p, p, p, i, i, i, i, i, i, i, *[ctypes.c_long] * 7, ctypes.c_float, i]
    lib.ckernels_attend_one.restype = i
    lib.ckernels_weighted_sum.argtypes = [p, p, i, i, p, p, i]
    lib.ckernels_rms_norm.argtypes = [p, p, p, i, i, i, ctypes.c_float]
    lib.ckernels_attention_block.argtypes = [p, p, p, p, p, p, p, ctypes.c_long, i, i, i, i, i, i, ctypes.c_float,
                                             i, p, i, p, p, p, p, i]
    lib.ckernels_attention_block.restype = i
    _lib = lib
    return lib


def _ok(status: int) -> None:
    if status == -2:
        raise RuntimeError("int8 activations need a CPU with AVX-512 VNNI")
    if status != 0:  # the kernels' only other failure: their small work buffer
        raise MemoryError("C kernel: could not allocate its work buffer")


def available() -> bool:
    return _load() is not None


def takes(w) -> bool:
    """Whether these kernels compute GroupedWeight `w`: 4-bit int4/e2m1 codes without zero points, a scale
    dtype they read, groups of a multiple of 32, contiguous parts."""
    lib = _load()
    if lib is None or w.q.dtype != torch.uint8 or w.codes not in TABLES or w.zero is not None:
        return False
    cols = w.q.shape[1] * 2
    return (w.scale.dtype in SCALE_KINDS and cols % w.scale.shape[1] == 0
            and bool(lib.ckernels_group_ok(cols // w.scale.shape[1]))
            and w.q.is_contiguous() and w.scale.is_contiguous())


def dense_matvec(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """x [1, cols] times a dense bf16 / fp16 w [rows, cols] of x's dtype transposed, summed in float32:
    [1, rows] in `dtype` (float32, or rounded to nearest even as `.to(dtype)` does); None where these kernels do
    not take them (then the caller computes it)."""
    if (_load() is None or w.dtype not in (torch.bfloat16, torch.float16) or x.dtype != w.dtype
            or not w.is_contiguous() or dtype not in SCALE_KINDS):
        return None
    x = x.contiguous()
    y = torch.empty(1, w.shape[0], dtype=dtype)
    _ok(_lib.ckernels_dense_matvec(w.data_ptr(), SCALE_KINDS[w.dtype], w.shape[0], w.shape[1], x.data_ptr(),
                                   y.data_ptr(), SCALE_KINDS[dtype], torch.get_num_threads()))
    return y


def router_guess(router: torch.Tensor, norm: torch.Tensor, x: torch.Tensor, k: int) -> list[int] | None:
    """The k experts a half-precision router [experts, hidden] ranks first for norm * x (norm: the post-attention
    norm's weight, x [hidden]: the layer's input), largest first, summed in float32: a guess at the layer's choice
    before its attention has run. None where these kernels do not take them."""
    if (_load() is None or router.dtype not in (torch.bfloat16, torch.float16) or norm.dtype != router.dtype
            or x.dtype != router.dtype or not router.is_contiguous() or not x.is_contiguous()
            or not norm.is_contiguous() or not 0 < k <= router.shape[0]):
        return None
    idx = (ctypes.c_int * k)()
    _ok(_lib.ckernels_router_guess(router.data_ptr(), norm.data_ptr(), x.data_ptr(), SCALE_KINDS[router.dtype],
                                   router.shape[0], router.shape[1], k, idx, torch.get_num_threads()))
    return list(idx)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """One query per row's attention: q [b, hq, 1, dk], k [b, hkv, T, dk], v [b, hkv, T, dv] (hq a multiple of
    hkv, one dtype, rows of k and v contiguous), `mask` None or boolean [b, 1, 1, T] (False hides a position):
    the output [b, 1, hq, dv] (transformers' layout after attention), summed in float32; None where these
    kernels do not take the inputs (the caller then uses torch's sdpa)."""
    if _load() is None or q.dtype not in SCALE_KINDS or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    b, hq, _, dk = q.shape
    hkv, t = k.shape[1], k.shape[2]
    if (k.dtype != q.dtype or v.dtype != q.dtype or q.shape[2] != 1 or k.shape[0] != b or v.shape[0] != b
            or tuple(v.shape[1:3]) != (hkv, t) or hq % hkv or k.shape[3] != dk or k.stride(3) != 1
            or v.stride(3) != 1 or q.device.type != "cpu" or k.device.type != "cpu" or v.device.type != "cpu"):
        return None
    if mask is not None:
        if mask.dtype != torch.bool or mask.device.type != "cpu" or tuple(mask.shape) != (b, 1, 1, t):
            return None
        mask = mask.reshape(b, t).contiguous().view(torch.uint8)
    q = q.contiguous()
    out = torch.empty(b, 1, hq, v.shape[3], dtype=q.dtype)
    _ok(_lib.ckernels_attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), None if mask is None else mask.data_ptr(),
                                 out.data_ptr(), SCALE_KINDS[q.dtype], b, hq, hkv, t, dk, v.shape[3], q.stride(0),
                                 k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), scale,
                                 torch.get_num_threads()))
    return out


def weighted_sum(ys: torch.Tensor, slots: list[int], weights: torch.Tensor, out: torch.Tensor) -> bool:
    """out [hidden] += ys[j] cast to out's dtype times weights[slots[j]], for each row j of ys [n, hidden]
    float32 in turn, rounded as transformers' eager experts loop rounds it (one token); False (nothing done)
    where these kernels do not take the arguments."""
    if (_load() is None or out.dtype not in SCALE_KINDS or weights.dtype != out.dtype or not out.is_contiguous()
            or not weights.is_contiguous() or ys.dtype != torch.float32 or not ys.is_contiguous()
            or ys.shape != (len(slots), out.numel())):
        return False
    order = (ctypes.c_int * len(slots))(*slots)
    _lib.ckernels_weighted_sum(ys.data_ptr(), order, len(slots), out.numel(), weights.data_ptr(), out.data_ptr(),
                               SCALE_KINDS[out.dtype])
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """transformers' RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`, in float32) over x's last
    dimension; None where these kernels do not take the arguments."""
    if (_load() is None or x.dtype not in SCALE_KINDS or weight.dtype != x.dtype or x.device.type != "cpu"
            or weight.dim() != 1 or x.shape[-1] != weight.shape[0] or not weight.is_contiguous()):
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    _lib.ckernels_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), SCALE_KINDS[x.dtype],
                           x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def attention_block(lean, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor, positions: int, out: torch.Tensor, normed: torch.Tensor,
                    logits: torch.Tensor | None, next_router: torch.Tensor | None,
                    next_logits: torch.Tensor | None) -> None:
    """One decode token x [hidden] (half precision, contiguous) through a decoder layer's attention block and
    residual into out [hidden], then its post-attention norm into normed [hidden] and, for a sparse layer, its
    router's logits into logits [experts] (x's dtype); with next_router [experts, hidden], the next layer's router
    applied to normed into next_logits [experts] float32 (a guess). decode.LeanLayer `lean` gives the weights;
    keys, values [1, kv heads, capacity, head dim] hold `positions` positions and take the new one at index
    `positions`; cos, sin [head dim]."""
    _ok(_lib.ckernels_attention_block(
        x.data_ptr(), lean.pointers, lean.eps, cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(),
        keys.stride(1), positions, SCALE_KINDS[x.dtype], x.numel(), lean.heads, lean.kv_heads, lean.head_dim,
        lean.scaling, 0 if logits is None else logits.numel(), None if next_router is None else next_router.data_ptr(),
        0 if next_router is None else next_router.shape[0], out.data_ptr(), normed.data_ptr(),
        None if logits is None else logits.data_ptr(), None if next_logits is None else next_logits.data_ptr(),
        torch.get_num_threads()))


KQUANTS = ("Q4_K", "Q5_K", "Q6_K")  # ckernels_kquant_matvec's `bits`: the digit


def takes_kquant(w) -> bool:
    """Whether these kernels compute kernels.KQuantWeight `w`: Q4_K, Q5_K or Q6_K blocks, contiguous."""
    return _load() is not None and w.type_name in KQUANTS and w.blocks.is_contiguous()


def kquant_matvec(x: torch.Tensor, w) -> torch.Tensor:
    """x [tokens, cols] float32 contiguous times `w` (takes_kquant(w)) transposed: [tokens, rows] float32."""
    rows, cols = w.blocks.shape[0], w.blocks.shape[1] // BLOCK_BYTES[w.type_name] * QK_K
    y = torch.empty(x.shape[0], rows)
    _ok(_lib.ckernels_kquant_matvec(w.blocks.data_ptr(), int(w.type_name[1]), rows, cols, x.data_ptr(),
                                    x.shape[0], y.data_ptr(), torch.get_num_threads()))
    return y


def matvec(x: torch.Tensor, w) -> torch.Tensor:
    """x [tokens, cols] float32 contiguous times `w` (takes(w)) transposed: [tokens, rows] float32."""
    rows, cols = w.q.shape[0], w.q.shape[1] * 2
    y = torch.empty(x.shape[0], rows)
    _ok(_lib.ckernels_matvec(w.q.data_ptr(), w.scale.data_ptr(), SCALE_KINDS[w.scale.dtype], rows, cols,
                             cols // w.scale.shape[1], TABLES[w.codes].data_ptr(), x.data_ptr(), x.shape[0],
                             y.data_ptr(), torch.get_num_threads()))
    return y


@dataclass(frozen=True)
class ExpertLayout:
    """Where a SiLU-gated int4 expert's parts lie in its store record (byte offsets of gate_up's codes and
    scales, then down's), with what ckernels_experts_one needs to read them: decode computes straight from
    the record's bytes, with no views or weight objects per expert."""

    offsets: tuple[int, int, int, int]
    kinds: tuple[int, int]
    groups: tuple[int, int]
    hidden: int
    inter: int


def expert_layout(slots) -> ExpertLayout | None:
    """The layout of records made of exactly gate_up_proj and down_proj as int4 codes and group scales
    (store.TensorSlot list), when these kernels compute them; else None."""
    if _load() is None:
        return None
    parts = {s.name: s for s in slots}
    if set(parts) != {"gate_up_proj.q", "gate_up_proj.scale", "down_proj.q", "down_proj.scale"}:
        return None
    gq, gs, dq, ds = (parts[n] for n in ("gate_up_proj.q", "gate_up_proj.scale", "down_proj.q", "down_proj.scale"))
    dtypes = {str(d).removeprefix("torch."): k for d, k in SCALE_KINDS.items()}
    if gq.dtype != "uint8" or dq.dtype != "uint8" or gs.dtype not in dtypes or ds.dtype not in dtypes:
        return None
    (rows, half), (hidden, dhalf) = gq.shape, dq.shape
    inter = rows // 2
    if (rows % 2 or 2 * half != hidden or 2 * dhalf != inter or gs.shape[0] != rows or ds.shape[0] != hidden
            or hidden % gs.shape[1] or inter % ds.shape[1]):
        return None
    groups = (hidden // gs.shape[1], inter // ds.shape[1])
    if not all(_lib.ckernels_group_ok(g) for g in groups):
        return None
    return ExpertLayout((gq.offset, gs.offset, dq.offset, ds.offset), (dtypes[gs.dtype], dtypes[ds.dtype]), groups,
                        hidden, inter)


def int8_available() -> bool:
    """Whether the int8-activation kernel was built: AVX-512 VNNI."""
    return _load() is not None and bool(_lib.ckernels_q8_ok(32, 32))


def int8_ok(layout: ExpertLayout) -> bool:
    """Whether record_mlp can take int8 activations for this layout: groups of 32, int8_available()."""
    return (int8_available() and layout.groups == (32, 32)
            and bool(_lib.ckernels_q8_ok(layout.hidden, 32)) and bool(_lib.ckernels_q8_ok(layout.inter, 32)))


def record_mlp(records: Sequence[torch.Tensor], layout: ExpertLayout, x: torch.Tensor, outs: Sequence[torch.Tensor],
               int8: bool = False) -> None:
    """One token x [hidden] float32 through the experts stored in `records` (uint8, `layout`), each into its
    `outs` row ([hidden] float32; all contiguous). Several experts are shared out among the threads, each
    computed whole by one. `int8` (lossy, where int8_ok(layout)): x and the experts' intermediate activations
    rounded per block of 32 to int8, the products integer dot products, as llama.cpp's Q4_0 x Q8_0."""
    parts = (ctypes.c_uint64 * (5 * len(records)))(*[
        p for r, y in zip(records, outs) for p in (*(r.data_ptr() + o for o in layout.offsets), y.data_ptr())])
    _ok(_lib.ckernels_experts_one(parts, len(records), layout.kinds[0], layout.groups[0], layout.kinds[1],
                                  layout.groups[1], layout.hidden, layout.inter, TABLES["int4"].data_ptr(), int(int8),
                                  x.data_ptr(), torch.get_num_threads()))


def silu_mlp(x: torch.Tensor, gate_up, down) -> torch.Tensor:
    """x [tokens, hidden] float32 contiguous through a SiLU-gated expert (takes() both, one code table):
    [tokens, hidden]."""
    inter, hidden = gate_up.q.shape[0] // 2, down.q.shape[0]
    y = torch.empty(x.shape[0], hidden)
    _ok(_lib.ckernels_silu_mlp(gate_up.q.data_ptr(), gate_up.scale.data_ptr(), SCALE_KINDS[gate_up.scale.dtype],
                               hidden // gate_up.scale.shape[1], down.q.data_ptr(), down.scale.data_ptr(),
                               SCALE_KINDS[down.scale.dtype], inter // down.scale.shape[1], hidden, inter,
                               TABLES[gate_up.codes].data_ptr(), x.data_ptr(), x.shape[0], y.data_ptr(),
                               torch.get_num_threads()))
    return y
