"""Per-expert compute time of each weight format and kernel path, for M = 1 and M = 64 tokens.

One expert of Qwen3-30B-A3B's shape (gate_up 1536 x 2048, down 2048 x 768) per call, rotating over
enough experts that their weights do not stay in CPU caches. Prints and saves ms per expert and
stored-weight GB/s beside a memcpy of the same bytes. Not a test.

    python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine_description, write_section
from moestream.native import dequantize_fp4, dequantize_fp8
from moestream.quant import dequantize, dequantize_gguf, quantize

MARK = "<!-- bench_kernels -->"


def make_experts(n: int, hidden: int, inter: int) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    out = []
    for _ in range(n):
        gu = torch.randn(2 * inter, hidden) * 0.02
        dn = torch.randn(hidden, inter) * 0.02
        e = {"gu_bf16": gu.bfloat16(), "dn_bf16": dn.bfloat16(), "gu_f32": gu, "dn_f32": dn}
        for name, w in (("gu", gu), ("dn", dn)):
            q8, q4 = quantize(w, "int8"), quantize(w, "int4", 32)
            e[f"{name}_q8"], e[f"{name}_s8"] = q8["q"], q8["scale"]
            e[f"{name}_q4"], e[f"{name}_s4"] = q4["q"], q4["scale"]
            e[f"{name}_s8f"] = q8["scale"].float()
            e[f"{name}_s4h"] = q4["scale"].half()  # as a GGUF Q4_0 import stores them
            e[f"{name}_q4k"] = _q4k_blocks(w.shape)  # llama.cpp Q4_K blocks as a GGUF import keeps them
            e[f"{name}_f8"], e[f"{name}_f8s"] = _fp8_blocks(w)  # DeepSeek-V3 FP8, as a native store keeps it
            e[f"{name}_f4"] = torch.randint(0, 256, (w.shape[0], w.shape[1] // 2), dtype=torch.uint8)  # MXFP4
            e[f"{name}_f4s"] = torch.randint(118, 122, (w.shape[0], w.shape[1] // 32), dtype=torch.uint8)
        out.append(e)
    return out


def _fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and fp32 scale_inv per 128x128 block (dimensions here are multiples of 128)."""
    rows, cols = w.shape
    scale = w.view(rows // 128, 128, cols // 128, 128).abs().amax(dim=(1, 3)) / 448
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
    return (w / full).to(torch.float8_e4m3fn), scale


def _q4k_blocks(shape) -> torch.Tensor:
    """Random valid Q4_K blocks (144 bytes per 256 values; fp16 d and dmin at the start of each block)."""
    rows, cols = shape
    b = torch.randint(0, 256, (rows, cols // 256, 144), dtype=torch.uint8)
    b[..., 0:2] = torch.full((rows, cols // 256), 0.001, dtype=torch.float16).unsqueeze(-1).view(torch.uint8)
    b[..., 2:4] = torch.full((rows, cols // 256), 0.004, dtype=torch.float16).unsqueeze(-1).view(torch.uint8)
    return b.view(rows, -1)


def mlp(x, gu, dn):
    g, u = F.linear(x, gu).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, dn)


def paths():
    def int8_fused(x, q, s):  # dequantise inside the matmul, for torch.compile to fuse
        return (x @ q.t().to(x.dtype)) * s

    fused = torch.compile(int8_fused, dynamic=False)

    def compiled_int8(e, x):
        g, u = fused(x, e["gu_q8"], e["gu_s8f"]).chunk(2, dim=-1)
        return fused(F.silu(g) * u, e["dn_q8"], e["dn_s8f"])

    return {
        "bf16 F.linear": (lambda e, x: mlp(x.bfloat16(), e["gu_bf16"], e["dn_bf16"]), ("gu_bf16", "dn_bf16")),
        "fp32 F.linear": (lambda e, x: mlp(x, e["gu_f32"], e["dn_f32"]), ("gu_f32", "dn_f32")),
        "bf16 record -> fp32 + F.linear": (lambda e, x: mlp(x, e["gu_bf16"].float(), e["dn_bf16"].float()),
                                           ("gu_bf16", "dn_bf16")),
        "int8 expand (moestream) + fp32 F.linear": (
            lambda e, x: mlp(x, dequantize(e["gu_q8"], e["gu_s8"], torch.float32),
                             dequantize(e["dn_q8"], e["dn_s8"], torch.float32)), ("gu_q8", "gu_s8", "dn_q8", "dn_s8")),
        "int8 _weight_int8pack_mm (bf16 x)": (
            lambda e, x: _int8pack(e, x.bfloat16()), ("gu_q8", "gu_s8", "dn_q8", "dn_s8")),
        "int8 torch.compile fused dequant+matmul": (compiled_int8, ("gu_q8", "gu_s8", "dn_q8", "dn_s8")),
        "int4 g32 whole expert, C AVX-512 kernel (moestream decode where it builds, fp32 x)": (
            lambda e, x: _whole(e, x, c=True), ("gu_q4", "gu_s4h", "dn_q4", "dn_s4h")),
        "int4 g32 whole expert, compiled torch kernel (fp32 x)": (
            lambda e, x: _whole(e, x, c=False), ("gu_q4", "gu_s4h", "dn_q4", "dn_s4h")),
        "int4 g32 GroupedWeight (moestream: C kernel up to 32 tokens where it builds, else compiled; fp32 x)": (
            lambda e, x: _grouped(e, x), ("gu_q4", "gu_s4h", "dn_q4", "dn_s4h")),
        "int4 g32 GroupedWeight, bf16 x": (lambda e, x: _grouped(e, x.bfloat16()), ("gu_q4", "gu_s4h", "dn_q4", "dn_s4h")),
        "GGUF Q4_K blocks: KQuantWeight (moestream: C kernel up to 32 tokens where it builds, else compiled; fp32 x)": (
            lambda e, x: _kquant(e, x), ("gu_q4k", "dn_q4k")),
        "GGUF Q4_K blocks: gguf-py dequantise + fp32 F.linear": (
            lambda e, x: mlp(x, dequantize_gguf(e["gu_q4k"], "Q4_K", torch.float32),
                             dequantize_gguf(e["dn_q4k"], "Q4_K", torch.float32)), ("gu_q4k", "dn_q4k")),
        "FP8 e4m3 128x128 blocks (native): expand + fp32 F.linear": (
            lambda e, x: mlp(x, dequantize_fp8(e["gu_f8"], e["gu_f8s"], (128, 128)),
                             dequantize_fp8(e["dn_f8"], e["dn_f8s"], (128, 128))), ("gu_f8", "gu_f8s", "dn_f8", "dn_f8s")),
        "FP8 e4m3 128x128 blocks (native): GroupedWeight (moestream: compiled, fp32 x)": (
            lambda e, x: _native(e, x, "f8"), ("gu_f8", "gu_f8s", "dn_f8", "dn_f8s")),
        "FP4 e2m1 + E8M0 g32 (native): GroupedWeight (moestream: C kernel up to 32 tokens where it builds, else compiled; fp32 x)": (
            lambda e, x: _native(e, x, "f4"), ("gu_f4", "gu_f4s", "dn_f4", "dn_f4s")),
        "FP4 e2m1 + E8M0 g32 (native MXFP4 / V4): expand + fp32 F.linear": (
            lambda e, x: mlp(x, dequantize_fp4(e["gu_f4"], e["gu_f4s"]), dequantize_fp4(e["dn_f4"], e["dn_f4s"])),
            ("gu_f4", "gu_f4s", "dn_f4", "dn_f4s")),
        "int4 expand (eager dequantize) + fp32 F.linear": (
            lambda e, x: mlp(x, dequantize(e["gu_q4"], e["gu_s4"], torch.float32),
                             dequantize(e["dn_q4"], e["dn_s4"], torch.float32)), ("gu_q4", "gu_s4", "dn_q4", "dn_s4")),
    }


def _grouped(e, x):
    from moestream.kernels import GroupedWeight

    g, u = GroupedWeight(e["gu_q4"], e["gu_s4h"]).linear(x).chunk(2, dim=-1)
    return GroupedWeight(e["dn_q4"], e["dn_s4h"]).linear(F.silu(g) * u)


def _whole(e, x, c: bool):
    """One token through the whole SiLU-gated expert in one call (decode's path)."""
    from moestream import ckernels, kernels
    from moestream.kernels import GroupedWeight

    if x.shape[0] != 1:
        raise ValueError("one-token kernel: not used for more tokens")
    if c:
        if not ckernels.available():
            raise RuntimeError("C kernels unavailable here (no AVX-512 or no compiler)")
        return ckernels.silu_mlp(x, GroupedWeight(e["gu_q4"], e["gu_s4h"]), GroupedWeight(e["dn_q4"], e["dn_s4h"]))
    return kernels._mlp(x, e["gu_q4"], e["gu_s4h"].float(), "int4", None, e["dn_q4"], e["dn_s4h"].float(), "int4",
                        None)


def _kquant(e, x):
    from moestream.kernels import KQuantWeight

    g, u = KQuantWeight(e["gu_q4k"], "Q4_K").linear(x).chunk(2, dim=-1)
    return KQuantWeight(e["dn_q4k"], "Q4_K").linear(F.silu(g) * u)


def _native(e, x, kind):
    from moestream.native import grouped_part

    def weight(name):
        if kind == "f8":
            return grouped_part("w", {"w.fp8": e[f"{name}_f8"], "w.fp8_scale128x128": e[f"{name}_f8s"]})
        return grouped_part("w", {"w.fp4": e[f"{name}_f4"], "w.fp4_scale": e[f"{name}_f4s"]})

    g, u = weight("gu").linear(x).chunk(2, dim=-1)
    return weight("dn").linear(F.silu(g) * u)


def _int8pack(e, x):
    g, u = torch._weight_int8pack_mm(x, e["gu_q8"], e["gu_s8"]).chunk(2, dim=-1)
    return torch._weight_int8pack_mm((F.silu(g) * u).contiguous(), e["dn_q8"], e["dn_s8"])


def measure(fn, experts, tokens: int, hidden: int, seconds: float) -> float:
    x = torch.randn(tokens, hidden)
    with torch.inference_mode():  # warm-up (and compile) in the mode measured: compiled graphs guard on it
        for e in experts[:3]:
            fn(e, x)
    n, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - t0 < seconds or n < len(experts):
            fn(experts[n % len(experts)], x)
            n += 1
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=48, help="experts to rotate over (default 48: ~450 MB bf16)")
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument("--out", default="benchmarks/results/bench_kernels.json")
    ap.add_argument("--results-md", default="benchmarks/RESULTS.md")
    args = ap.parse_args()
    hidden, inter = 2048, 768
    experts = make_experts(args.experts, hidden, inter)
    # memcpy of one bf16 expert's bytes at a time, rotating over as many bytes as the experts take, so
    # that (like the weights) the source is not in CPU cache: the bandwidth the kernels are held against
    one = 3 * hidden * inter * 2
    src = torch.ones(args.experts * one, dtype=torch.uint8)
    dst = torch.empty(one, dtype=torch.uint8)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0 or n < args.experts:
        dst.copy_(src[(n % args.experts) * one:(n % args.experts + 1) * one])
        n += 1
    memcpy = one * n / (time.perf_counter() - t0)
    del src
    rows = []
    for name, (fn, keys) in paths().items():
        stored = sum(experts[0][k].numel() * experts[0][k].element_size() for k in keys)
        for tokens in (1, 64):
            try:
                sec = measure(fn, experts, tokens, hidden, args.seconds)
                rows.append({"path": name, "tokens": tokens, "ms_per_expert": sec * 1e3, "stored_bytes": stored,
                             "weight_gb_s": stored / sec / 1e9})
            except Exception as e:  # a kernel this torch build lacks is reported, not hidden
                rows.append({"path": name, "tokens": tokens, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine_description(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "memcpy_gb_s": memcpy / 1e9,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    lines = ["## Expert compute kernels (one expert, Qwen3-30B-A3B shape)", "",
             f"Machine: {result['machine']}, torch {result['torch']}, {result['threads']} threads. Date: "
             f"{result['date']}. Command: `python benchmarks/bench_kernels.py`. Rotating over {args.experts} experts "
             f"(weights not cache-warm). memcpy of one bf16 expert's bytes at a time, rotating over the same "
             f"amount of memory: {memcpy / 1e9:.1f} GB/s.", "",
             "| path | ms per expert, M=1 | stored GB/s, M=1 | % of memcpy, M=1 | ms per expert, M=64 | "
             "stored GB/s, M=64 |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["path"] for r in rows):
        cells = []
        for tokens in (1, 64):
            r = next(r for r in rows if r["path"] == name and r["tokens"] == tokens)
            cells += ["n/a", r["error"]] if "error" in r else [f"{r['ms_per_expert']:.2f}", f"{r['weight_gb_s']:.2f}"]
            if tokens == 1:
                cells.append("n/a" if "error" in r else f"{100 * r['weight_gb_s'] * 1e9 / memcpy:.0f} %")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_section(Path(args.results_md), MARK, lines)
    print(f"wrote {args.out} and {args.results_md}")


if __name__ == "__main__":
    main()
