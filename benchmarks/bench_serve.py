"""Concurrent streams through `moestream serve`: aggregate and per-stream tok/s, bytes read per token.

Starts the real server (its own process) on the random demo model with an expert cache small enough
that single-stream decode is I/O-bound, then for 1, 2, 4 and 8 concurrent streaming requests
(fixed length: `ignore_eos`, different prompts) measures wall-clock aggregate tok/s, each stream's
decode tok/s (first token to last), and from /metrics the expert bytes read per generated token,
the hit rate and the mean batch size. The SSD is probed at the record size in the same run. Not a
test: it takes minutes.

    python benchmarks/bench_serve.py --scratch /tmp/moestream-bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from common import drop_caches, machine_description, synthetic_store, write_section
from moestream.probe import probe
from moestream.store import Store

MARK = "<!-- bench_serve {policy} {cache} -->"  # one RESULTS.md section per cache policy and size
PROMPTS = ["import collections\nclass LRUCache:", "def parse_args(argv=None):", "with open(path) as fh:",
           "for key, value in sorted(items):", "class Config(object):", "try:\n    import json",
           "def main():\n    parser =", "if __name__ == '__main__':"]


def metrics(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("moestream_"):
            name, value = line.rsplit(" ", 1)
            name = name.split("{")[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def stream(base: str, prompt: str, tokens: int, temperature: float, seed: int) -> dict:
    t0 = time.perf_counter()
    first, n = None, 0
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": temperature, "seed": seed,
            "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                n = d["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": n, "ttft": first - t0, "seconds": end - t0,
            "decode_tps": (n - 1) / (end - first) if n > 1 and end > first else 0.0}


def measure(base: str, streams: int, tokens: int, temperature: float) -> dict:
    before = metrics(base)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda i: stream(base, PROMPTS[i % len(PROMPTS)], tokens, temperature, i),
                             range(streams)))
    wall = time.perf_counter() - t0
    after = metrics(base)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    generated = d["moestream_generated_tokens_total"]
    lookups = d["moestream_expert_cache_hits_total"] + d["moestream_expert_cache_misses_total"]
    return {
        "streams": streams, "tokens_per_stream": tokens, "wall_seconds": wall,
        "aggregate_tps": sum(r["tokens"] for r in runs) / wall,
        "per_stream_decode_tps": [r["decode_tps"] for r in runs],
        "mean_ttft": sum(r["ttft"] for r in runs) / streams,
        "bytes_read_per_token": d["moestream_expert_bytes_read_total"] / generated if generated else 0.0,
        "hit_rate": d["moestream_expert_cache_hits_total"] / lookups if lookups else 0.0,
        "mean_batch": d["moestream_decode_rows_total"] / max(1, d["moestream_decode_steps_total"]),
        "read_wait_share": d["moestream_expert_read_wait_seconds_total"] / wall,
        "read_bytes_per_second": d["moestream_expert_bytes_read_total"] / wall,
        "peak_rss": after["moestream_peak_resident_bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scratch", default="scratch/bench_serve")
    ap.add_argument("--cache", default="256MB", help="expert cache (default 256MB: ~21%% of the experts)")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampling temperature, stream i seeded with i (default 1: a random model's greedy output "
                         "repeats one token, which routes to the same experts and hides the I/O)")
    ap.add_argument("--cache-policy", default="lru", choices=["lru", "lfu"])
    ap.add_argument("--out", help="JSON results (default benchmarks/results/bench_serve-POLICY-CACHE.json)")
    ap.add_argument("--results-md", default="benchmarks/RESULTS.md")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    scratch = Path(args.scratch)
    proc = None
    try:
        store = synthetic_store(scratch)
        s = Store.open(store)
        record = s.layers[0].record_bytes
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        streams = [int(x) for x in args.streams.split(",")]
        dropped = drop_caches()
        proc = subprocess.Popen([sys.executable, "-m", "moestream.cli", "serve", str(store), "--name", "bench",
                                 "--port", str(port), "--cache", args.cache, "--device", "cpu", "--context", "512",
                                 "--max-batch", str(max(streams)), "--max-queue", "0",
                                 "--cache-policy", args.cache_policy],
                                env={**os.environ, "MOESTREAM_API_KEY": ""})
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            time.sleep(0.5)
        stream(base, PROMPTS[0], 8, 0.0, 0)  # warm-up: first-call costs out of the measurement
        ssd = probe(scratch, record, 8, seconds=3.0)
        rows = []
        for n in streams:
            row = measure(base, n, args.tokens, args.temperature)
            rows.append(row)
            print(f"{n} streams: aggregate {row['aggregate_tps']:.2f} tok/s, per stream "
                  f"{min(row['per_stream_decode_tps']):.2f}-{max(row['per_stream_decode_tps']):.2f} tok/s, "
                  f"{row['bytes_read_per_token'] / 1e6:.1f} MB read/token, hit rate {100 * row['hit_rate']:.0f} %, "
                  f"mean batch {row['mean_batch']:.2f}", flush=True)
        result = {"machine": machine_description(), "store": str(store), "expert_bytes": s.expert_bytes,
                  "record_bytes": record, "cache": args.cache, "page_cache_dropped": dropped,
                  "ssd_probe": dataclasses.asdict(ssd), "rows": rows,
                  "command": " ".join(sys.argv)}
        args.out = args.out or f"benchmarks/results/bench_serve-{args.cache_policy}-{args.cache}.json"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        one = rows[0]["aggregate_tps"]
        lines = [
            "## Concurrent streams through `moestream serve` (benchmarks/bench_serve.py)", "",
            f"Machine: {result['machine']}. Random demo model ({s.expert_bytes / 1e9:.2f} GB of bf16 experts, "
            f"{record / 1e6:.1f} MB per record), expert cache {args.cache} ({args.cache_policy}), {args.tokens} "
            f"tokens per stream, temperature {args.temperature} (stream i seeded i), `ignore_eos`. SSD probe at the record size, depth 8, same run: "
            f"{ssd.peak_bandwidth / 1e9:.2f} GB/s. Command: `python benchmarks/bench_serve.py`.", "",
            "| streams | aggregate tok/s | × one stream | per-stream decode tok/s | MB read / generated token "
            "| hit rate | mean batch | read GB/s (× SSD probe) | peak RSS |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            per = r["per_stream_decode_tps"]
            lines.append(f"| {r['streams']} | {r['aggregate_tps']:.2f} | {r['aggregate_tps'] / one:.2f} | "
                         f"{min(per):.2f}–{max(per):.2f} | {r['bytes_read_per_token'] / 1e6:.1f} | "
                         f"{100 * r['hit_rate']:.0f} % | {r['mean_batch']:.2f} | {r['read_bytes_per_second'] / 1e9:.2f} "
                         f"({r['read_bytes_per_second'] / ssd.peak_bandwidth:.2f}) | {r['peak_rss'] / 1e6:.0f} MB |")
        write_section(Path(args.results_md), MARK.format(policy=args.cache_policy, cache=args.cache), lines)
        print(f"wrote {args.out} and {args.results_md}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
