"""Decode under memory caps: moestream against llama.cpp on the same weights, beside the SSD's ceiling.

Writes on demand, under --scratch, a synthetic Qwen3-MoE-shaped GGUF (default: hidden 2048, 24
layers, 128 experts, top-8, expert intermediate 768, Q4_0 experts from random blocks, F16 dense:
about 8.8 GB) and converts it with `moestream convert` (Q4_0 experts become int4 g32 bit for bit:
both engines hold the same expert bytes). For each memory cap it drops the page cache, then runs
in a memory cgroup of that size (cgroup v1 or v2 where this process may create one; the JSON says
which, or that none was used):

- `moestream run STORE --memory CAP` (its own process; its stats JSON gives the figures), and
- llama.cpp through llama-cpp-python (the `bench` extra), mmap, greedy, 2 threads, once per disk
  read-ahead setting where /sys/block/DEV/queue/read_ahead_kb is writable (restored afterwards);
  bytes read from /proc/self/io.

Beside them: the project's own O_DIRECT probe of the SSD at the record size and queue depth (at the
start, and just before and after each capped row's moestream runs), the I/O-bound ceiling (the row's
mean probe bandwidth / bytes read per token) for moestream's observed miss rate, and the share of
decode time the disk had one of moestream's reads in flight.
A `resident` row runs both with every weight in memory (moestream pins every expert; llama.cpp
runs twice and keeps the second). Not a test: it takes tens of minutes and ~18 GB of disk.

    python benchmarks/bench_decode.py --scratch /tmp/moestream-decode
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import drop_caches, machine_description, write_section

MARK = "<!-- bench_decode temperature {temperature} embedding {embedding} -->"
PROMPT = "import collections\nclass LRUCache:\n    def __init__(self, capacity):"

LLAMA_RUNNER = r"""
import json, os, sys, time
import llama_cpp.llama_cpp as lc
path, prompt, n, repack, temp = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", float(sys.argv[5])
if not repack:  # llama.cpp's --no-repack: compute from the mmap'd file instead of an anonymous repacked copy
    default = lc.llama_model_default_params
    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    lc.llama_model_default_params = params
from llama_cpp import Llama
def io():
    return int(next(l.split()[1] for l in open("/proc/self/io") if l.startswith("read_bytes")))
t0 = time.perf_counter()
llm = Llama(model_path=path, n_ctx=512, n_threads=2, n_threads_batch=2, use_mmap=True, verbose=False, seed=0)
load = time.perf_counter() - t0
ids = llm.tokenize(prompt.encode(), add_bos=False)
r0, t1 = io(), time.perf_counter()
llm.eval(ids)
tok = int(llm.sample(temp=temp, top_k=0, top_p=1.0, min_p=0.0))
t2, r1 = time.perf_counter(), io()
for _ in range(n - 1):
    llm.eval([tok])
    tok = int(llm.sample(temp=temp, top_k=0, top_p=1.0, min_p=0.0))
t3, r2 = time.perf_counter(), io()
hwm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM"))) * 1024
print(json.dumps({"repack": repack, "load_seconds": load, "prompt_tokens": len(ids), "ttft_seconds": t2 - t1,
                  "decode_tps": (n - 1) / (t3 - t2), "decode_bytes_per_token": (r2 - r1) / (n - 1),
                  "prefill_bytes": r1 - r0, "peak_rss": hwm}))
"""


def synthetic_gguf(path: Path, shape: dict, seed: int = 0, embedding_std: float = 0.02) -> Path:
    """A random Qwen3-MoE GGUF written tensor by tensor (never the whole model in memory).

    `embedding_std`: the token embeddings' spread (every other weight's is 0.02). At 0.02 the residual stream of
    this random model soon carries the same direction for every token and layers 4-23 route 40-64 of their 128
    experts (six prompts, 487 tokens); at 8 each token's embedding steers every layer, all 128 experts serve and
    the busiest 2-7.5x the mean, as in trained models, which use every expert (benchmarks/RESULTS.md)."""
    import gguf
    from transformers import Qwen3MoeConfig

    from moestream.demo import build_tokenizer
    from moestream.gguf_export import gguf_writer, tensor_names
    from moestream.skeleton import meta_model

    if path.is_file():
        return path
    tokenizer = build_tokenizer()
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, norm_topk_prob=True,
                            tie_word_embeddings=False, max_position_embeddings=4096, **shape)
    model = meta_model(config)
    names = tensor_names(model)
    rng = np.random.default_rng(seed)
    q4 = gguf.GGMLQuantizationType.Q4_0
    specs = []  # (gguf name, data maker)
    for hf, t in model.state_dict().items():
        if hf not in names:
            continue
        name = names[hf]
        shp = tuple(t.shape)
        if "_exps" in name:
            shp = (shp[0], shp[1] // 2, shp[2]) if "gate_exps" in name else shp
            parts = [name, name.replace("gate_exps", "up_exps")] if "gate_exps" in name else [name]
            for p in parts:
                specs.append((p, shp, q4))
        elif t.dim() == 1:
            specs.append((name, shp, "ones"))
        elif "ffn_gate_inp" in name:
            specs.append((name, shp, "router"))
        elif name == "token_embd.weight":
            specs.append((name, shp, "embedding"))
        else:
            specs.append((name, shp, "f16"))

    def make(shp, kind):
        if kind == q4:  # random nibbles, fp16 scales making weights of std ~0.02
            b = rng.integers(0, 256, size=(*shp[:-1], shp[-1] // 32, 18), dtype=np.uint8)
            b[..., 0:2] = np.full(b.shape[:-1], 0.0043, dtype=np.float16).view(np.uint8).reshape(*b.shape[:-1], 2)
            return b.reshape(*shp[:-1], -1)
        if kind == "ones":
            return np.ones(shp, dtype=np.float32)
        if kind == "router":  # spread-out logits, as trained routers have
            return rng.standard_normal(shp, dtype=np.float32)
        std = embedding_std if kind == "embedding" else 0.02
        return (rng.standard_normal(shp, dtype=np.float32) * std).astype(np.float16)

    tmp = path.with_name(path.name + ".partial")
    w = gguf_writer(tmp, config, tokenizer, "Q4_0")
    for name, shp, kind in specs:
        if kind == q4:
            nbytes = int(np.prod(shp[:-1])) * shp[-1] // 32 * 18
            w.add_tensor_info(name, (*shp[:-1], shp[-1] // 32 * 18), np.dtype(np.uint8), nbytes, raw_dtype=q4)
        else:
            dt = np.dtype(np.float16 if kind in ("f16", "embedding") else np.float32)
            w.add_tensor_info(name, shp, dt, int(np.prod(shp)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shp, kind in specs:
        w.write_tensor_data(make(shp, kind))
    w.close()
    tmp.rename(path)
    return path


def fresh_memory_gbps(nbytes: int = 2**30) -> float:
    """GB/s at which the machine gives a process fresh memory just after the page cache is dropped (private
    anonymous pages, populated). Every cold run pays it for its cache's growth; on VMs whose host takes back
    the guest's freed memory it is far below memcpy speed (seen here: 0.2 GB/s, then 0.7-1.3 GB/s once warm)."""
    drop_caches()
    time.sleep(3)  # let the freed pages go back, as they have before a capped run starts
    t0 = time.perf_counter()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0))
    seconds = time.perf_counter() - t0
    if not hasattr(mmap, "MAP_POPULATE"):  # touch every page instead
        t0 = time.perf_counter()
        np.frombuffer(m, dtype=np.uint8)[:: mmap.PAGESIZE] = 1
        seconds = time.perf_counter() - t0
    m.close()
    return nbytes / seconds / 1e9


@contextlib.contextmanager
def memory_cgroup(limit: int | None):
    """(kind, preexec) running a child inside a fresh memory cgroup of `limit` bytes, or (None, None)."""
    if limit is None:
        yield None, None
        return
    name = f"moestream-bench-{os.getpid()}"
    for kind, root, file in (("v2", Path("/sys/fs/cgroup"), "memory.max"),
                             ("v1", Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):
        d = root / name
        try:
            if kind == "v2" and "memory" not in (root / "cgroup.controllers").read_text():
                continue
            d.mkdir()
        except OSError:
            continue
        try:
            (d / file).write_text(str(limit))
        except OSError:
            d.rmdir()
            continue
        procs = d / "cgroup.procs"
        try:
            yield f"{kind} {file}={limit}", lambda: procs.write_text(str(os.getpid()))
        finally:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        return
    yield None, None


@contextlib.contextmanager
def readahead(path: Path, kb: int | None):
    """Set the read-ahead of the disk holding `path` (restored afterwards); yields the value in force."""
    dev = os.stat(path).st_dev
    sysdir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    f = sysdir / "queue" / "read_ahead_kb"
    if not f.exists():
        f = sysdir.parent / sysdir.resolve().parent.name / "queue" / "read_ahead_kb"  # a partition's disk
    try:
        old = int(f.read_text())
    except (OSError, ValueError):
        yield None
        return
    if kb is None or kb == old:
        yield old
        return
    try:
        f.write_text(str(kb))
    except OSError:
        yield old
        return
    try:
        yield kb
    finally:
        f.write_text(str(old))


def run_child(cmd: list[str], cap: int | None) -> tuple[subprocess.CompletedProcess, str | None]:
    """Run `cmd` in a memory cgroup of `cap` bytes where one can be made; (result, cgroup description)."""
    with memory_cgroup(cap) as (cg, pre):
        return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pre), cg


def moestream_run(store: Path, cap: int | None, tokens: int, temperature: float, pin: Path | None,
                  activations: str = "float", prefetch: str = "none") -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "moestream.cli", "run", str(store), "-p", PROMPT, "--raw", "-n", str(tokens),
               "--device", "cpu", "--stats-json", f.name, "--context", "512", "--temperature", str(temperature),
               "--seed", "0", "--activations", activations, "--prefetch", prefetch]
        cmd += ["--memory", str(cap)] if cap else ["--cache", "1TB"]
        cmd += ["--pin", str(pin), "--pin-share", "1"] if pin else []
        drop_caches()
        r, cg = run_child(cmd, cap)
        try:
            stats = json.loads(Path(f.name).read_text())
        except (OSError, json.JSONDecodeError):
            return {"error": r.stderr[-1500:], "cgroup": cg}
        io = stats["prefill"], stats["decode"]
        return {"load_seconds": stats["load_seconds"], "decode_tps": stats["decode_tps"],
                "prefill_tps": stats["prefill_tps"],
                "ttft_seconds": stats["ttft_seconds"], "decode_bytes_per_token": stats["decode_bytes_per_token"],
                "hit_rate": stats["hit_rate"], "read_mb_s": stats["read_mb_s"], "io_wait_share": stats["io_wait_share"],
                "peak_rss": stats["peak_rss"], "cache_budget": stats["cache_budget"], "cgroup": cg,
                "decode_misses": io[1]["misses"], "decode_disk_busy_share": stats["decode_disk_busy_share"]}


def llama_run(gguf_path: Path, cap: int | None, tokens: int, temperature: float, warm: bool = False) -> dict:
    """Resident (warm): llama.cpp's default, weights repacked into its faster layouts in anonymous memory.
    Capped: without repacking (--no-repack), else the repacked copy alone outgrows the cap (seen: OOM-killed
    at 6 GiB, 6.26 GB anonymous) and the experts could not be paged from the file at all."""
    cmd = [sys.executable, "-c", LLAMA_RUNNER, str(gguf_path), PROMPT, str(tokens), "1" if warm else "0",
           str(temperature)]
    if not warm:
        drop_caches()
    for _ in range(2 if warm else 1):  # warm: the second run, its file in the page cache
        r, cg = run_child(cmd, cap)
    if r.returncode != 0:
        return {"error": r.stderr[-1500:] or f"exit status {r.returncode}", "cgroup": cg}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "cgroup": cg}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scratch", default="scratch/bench_decode")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=768, help="expert intermediate size")
    ap.add_argument("--caps", default="6GiB,4GiB", help="memory caps (a resident row is always added)")
    ap.add_argument("--readahead-kb", default="8192,128", help="llama.cpp runs, one per disk read-ahead")
    ap.add_argument("--tokens", type=int, default=24, help="tokens generated per run")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy (default). A random model's greedy text repeats itself and so does its "
                         "routing; sampling (e.g. 1) spreads the experts used, as real text does")
    ap.add_argument("--embedding-std", type=float, default=8.0,
                    help="spread of the synthetic model's token embeddings: 8 (default) routes tokens over all "
                         "experts, as trained models do; 0.02 (the earlier sessions' model) over a third of them "
                         "after the first layers, so that 4 and 6 GiB held every expert it used")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--activations", default="float",
                    help="moestream runs per cap, one per --activations mode: float (exact), int8 (lossy, as "
                         "llama.cpp's Q4_0 x Q8_0), or both: float,int8")
    ap.add_argument("--prefetch", default="auto",
                    help="moestream runs per capped row and --activations mode, one per --prefetch mode (none, "
                         "lookahead, auto: moestream's default), e.g. none,auto,lookahead")
    ap.add_argument("--out", help="default: benchmarks/results/bench_decode-tTEMPERATURE.json")
    ap.add_argument("--results-md", default="benchmarks/RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (GGUF and store)")
    args = ap.parse_args()

    from moestream.convert import convert
    from moestream.probe import probe
    from moestream.sizes import parse_size
    from moestream.store import Store

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    shape = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, moe_intermediate_size=args.ff,
                 num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 num_experts=args.experts, num_experts_per_tok=args.top_k)
    llama = not args.no_llama
    if llama and importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed (pip install -e '.[bench]'): llama.cpp rows skipped")
        llama = False
    try:
        t0 = time.time()
        gguf_path = synthetic_gguf(scratch / f"model-emb{args.embedding_std:g}.gguf", shape,
                                   embedding_std=args.embedding_std)
        store_path = scratch / f"store-emb{args.embedding_std:g}"
        if not (store_path / "store.json").is_file():
            convert(str(gguf_path), store_path, force=True, progress=False)
        print(f"GGUF {gguf_path.stat().st_size / 1e9:.2f} GB and store ready in {time.time() - t0:.0f} s", flush=True)
        store = Store.open(store_path)
        record = store.layers[0].record_bytes
        ssd = probe(scratch, record, 8, seconds=3.0)  # the same probe as each capped row's, below
        print(ssd.describe(), flush=True)
        fresh = fresh_memory_gbps()
        print(f"fresh memory after dropping the page cache: {fresh:.2f} GB/s", flush=True)
        profile = scratch / "all-experts.json"  # pins every expert: the resident moestream run
        profile.write_text(json.dumps({"format": "moestream-profile", "version": 1, "tokens": 1,
                                       "counts": {str(i.layer): [1] * i.experts for i in store.layers},
                                       "record_bytes": {str(i.layer): i.record_bytes for i in store.layers}}))
        rows = []
        for cap_s in ["resident", *args.caps.split(",")]:
            cap = None if cap_s == "resident" else parse_size(cap_s)
            row = {"cap": cap_s, "cap_bytes": cap, "moestream": {}}
            # The disk's speed drifts from minute to minute (1.5-2.9 GB/s within ten minutes on the Xeon VM): each
            # capped row's ceiling divides by the mean of probes just before and just after its moestream runs.
            before = probe(scratch, record, ssd.queue_depth, seconds=3.0).peak_bandwidth if cap is not None else None
            for mode, pf in [(a, p) for p in args.prefetch.split(",") for a in args.activations.split(",")
                             if cap is not None or p == "none"]:  # resident: every expert pinned, nothing to guess
                key = mode if pf == "none" else f"{mode}+{pf}"
                row["moestream"][key] = moestream_run(store_path, cap, args.tokens, args.temperature,
                                                      profile if cap is None else None, mode, pf)
            if cap is not None:
                after = probe(scratch, record, ssd.queue_depth, seconds=3.0).peak_bandwidth
                row["ssd_probe_gbps"] = [before / 1e9, after / 1e9]
                print(cap_s, f"SSD probe before / after: {before / 1e9:.2f} / {after / 1e9:.2f} GB/s", flush=True)
            for key, m in row["moestream"].items():
                if "error" not in m and m["decode_bytes_per_token"] > 0 and cap is not None:
                    m["io_ceiling_tps"] = (before + after) / 2 / m["decode_bytes_per_token"]
                    m["share_of_io_ceiling"] = m["decode_tps"] / m["io_ceiling_tps"]
                print(cap_s, f"moestream {key}", json.dumps(m), flush=True)
            row["llama"] = {}
            if llama:
                for kb in ([None] if cap is None else [int(x) for x in args.readahead_kb.split(",")]):
                    with readahead(gguf_path, kb) as ra:
                        r = llama_run(gguf_path, cap, args.tokens, args.temperature, warm=cap is None)
                    r["read_ahead_kb"] = ra
                    row["llama"][str(ra)] = r
                    print(cap_s, f"llama.cpp read-ahead {ra} KiB", json.dumps(r), flush=True)
            rows.append(row)
        result = {"machine": machine_description(), "shape": shape, "gguf_bytes": gguf_path.stat().st_size,
                  "expert_bytes": store.expert_bytes, "dense_bytes": store.dense_bytes, "record_bytes": record,
                  "tokens": args.tokens, "temperature": args.temperature, "embedding_std": args.embedding_std,
                  "ssd_probe": {"peak_bandwidth": ssd.peak_bandwidth, "bandwidth_fit": ssd.bandwidth,
                                "latency": ssd.latency, "queue_depth": ssd.queue_depth, "direct": ssd.direct},
                  "fresh_memory_gbps": fresh, "rows": rows, "command": " ".join(sys.argv),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        emb = "" if args.embedding_std == 0.02 else f"-emb{args.embedding_std:g}"  # 0.02: the earlier files' names
        args.out = args.out or f"benchmarks/results/bench_decode-t{args.temperature:g}{emb}.json"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        write_section(Path(args.results_md), MARK.format(temperature=args.temperature, embedding=args.embedding_std),
                      table(result))
        print(f"wrote {args.out} and {args.results_md}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


def table(result: dict) -> list[str]:
    s = result["shape"]
    lines = ["## Decode under memory caps: moestream vs llama.cpp, same weights (benchmarks/bench_decode.py)", "",
             f"Machine: {result['machine']}. Date: {result['date']}. Synthetic Qwen3-MoE: {s['num_hidden_layers']} "
             f"layers × {s['num_experts']} experts, top-{s['num_experts_per_tok']}, hidden {s['hidden_size']}, expert "
             f"intermediate {s['moe_intermediate_size']}, token embeddings of std {result.get('embedding_std', 0.02):g} "
             f"(bench_decode.synthetic_gguf); GGUF {result['gguf_bytes'] / 1e9:.2f} GB with Q4_0 experts "
             f"(moestream: the same bytes as int4 g32, {result['record_bytes'] / 1e6:.2f} MB per expert record), F16 "
             f"dense (moestream: bf16). {result['tokens']} tokens, "
             f"{'greedy' if not result['temperature'] else 'temperature %g, seed 0' % result['temperature']}, page "
             f"cache dropped before each capped run; llama.cpp without weight repacking under a cap. "
             f"SSD probe (O_DIRECT, record size, depth 8) at the start: "
             f"{result['ssd_probe']['peak_bandwidth'] / 1e9:.2f} GB/s; each capped row's I/O ceiling divides by the "
             f"mean of probes just before and after its moestream runs (shown in the cap column). Disk busy: share of "
             f"decode time with at least one expert read in flight. Of both ceilings: the share of the lower of "
             f"that I/O ceiling and the same activations' resident speed in this run (a decode is bound by the "
             f"disk or by the compute, whichever is slower). "
             f"Fresh memory just after dropping the page cache (1 GiB populated): "
             f"{result.get('fresh_memory_gbps', float('nan')):.2f} GB/s. "
             f"Command: `{result['command']}`.", "",
             "| cap | engine | decode tok/s | × llama.cpp best | MB read / token | hit rate | I/O ceiling tok/s "
             "(share) | of both ceilings | disk busy | load s | TTFT s | peak RSS | cgroup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    resident = next((r["moestream"] for r in result["rows"] if r["cap_bytes"] is None), {})
    for row in result["rows"]:
        ll = row["llama"]
        cap = row["cap"] + (" (SSD {:.2f} / {:.2f} GB/s)".format(*row["ssd_probe_gbps"]) if "ssd_probe_gbps" in row
                            else "")
        best = max((r["decode_tps"] for r in ll.values() if "decode_tps" in r), default=None)
        ratio = lambda tps: f"{tps / best:.2f}" if best else "—"  # noqa: E731
        for mode, m in row["moestream"].items():
            activations, _, pf = mode.partition("+")
            engine = ("moestream" + ("" if activations == "float" else f", {activations} activations (lossy)")
                      + (f", {pf} prefetch" if pf else ""))
            if "error" in m:
                lines.append(f"| {cap} | {engine} | error: {m['error'][-120:]!r} | | | | | | | | | | |")
                continue
            ceiling = (f"{m['io_ceiling_tps']:.2f} ({100 * m['share_of_io_ceiling']:.0f} %)"
                       if "io_ceiling_tps" in m else "—")
            compute = resident.get(activations, {}).get("decode_tps")
            both = (f"{100 * m['decode_tps'] / min(compute, m['io_ceiling_tps']):.0f} %"
                    if compute and "io_ceiling_tps" in m else "—")
            busy = f"{100 * m['decode_disk_busy_share']:.0f} %" if "decode_disk_busy_share" in m else "—"
            lines.append(f"| {cap} | {engine} | {m['decode_tps']:.2f} | {ratio(m['decode_tps'])} | "
                         f"{m['decode_bytes_per_token'] / 1e6:.1f} | {100 * m['hit_rate']:.0f} % | {ceiling} | "
                         f"{both} | {busy} | "
                         f"{m.get('load_seconds', float('nan')):.2f} | {m['ttft_seconds']:.2f} | "
                         f"{m['peak_rss'] / 2**30:.2f} GiB | {m['cgroup'] or 'none'} |")
        for ra, r in ll.items():
            label = f"llama.cpp, read-ahead {ra} KiB" if row["cap_bytes"] else "llama.cpp (warm page cache)"
            if "error" in r:
                lines.append(f"| {cap} | {label} | error: {r['error'][-120:]!r} | | | | | | | | | | |")
                continue
            lines.append(f"| {cap} | {label} | {r['decode_tps']:.2f} | {ratio(r['decode_tps'])} | "
                         f"{r['decode_bytes_per_token'] / 1e6:.1f} | — | — | — | — | {r['load_seconds']:.2f} | "
                         f"{r['ttft_seconds']:.2f} | "
                         f"{r['peak_rss'] / 2**30:.2f} GiB | {r['cgroup'] or 'none'} |")
    return lines


if __name__ == "__main__":
    main()
