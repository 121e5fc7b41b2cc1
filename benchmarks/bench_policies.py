"""Cache policy x prefetch, measured side by side against the SSD's ceiling in the same run.

For each expert-cache size and each (policy, prefetch) pair, runs `moestream run` in its own process
(so peak RSS is its own) on the random demo model, and records decode tok/s, hit rate, MB read per
decoded token, read MB/s, I/O wait and peak RSS. Before each cache size the SSD is probed at the
record size (O_DIRECT, depth 8), and the I/O-bound ceiling for the run's own bytes per token is
reported beside it. Not a test: it takes minutes.

    python benchmarks/bench_policies.py --scratch /tmp/moestream-bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import drop_caches, machine_description, synthetic_store, write_section
from moestream.probe import probe
from moestream.store import Store

MARK = "<!-- bench_policies -->"
PROMPT = "import collections\nclass LRUCache:\n    def __init__(self, capacity):"


def one_run(store: Path, cache: int, policy: str, prefetch: str, tokens: int, pin: Path | None = None,
            scope: str = "global") -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "moestream.cli", "run", str(store), "-p", PROMPT, "--raw", "-n", str(tokens),
               "--cache", str(cache), "--cache-policy", policy, "--cache-scope", scope, "--prefetch", prefetch,
               "--device", "cpu",
               "--temperature", "1", "--seed", "0", "--stats-json", f.name] + (["--pin", str(pin)] if pin else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scratch", default="scratch/bench_policies")
    ap.add_argument("--caps", default="0.15,0.3,0.5", help="expert cache sizes as shares of all experts")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", default="benchmarks/results/bench_policies.json")
    ap.add_argument("--results-md", default="benchmarks/RESULTS.md")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    scratch = Path(args.scratch)
    rows = []
    try:
        store = synthetic_store(scratch)
        s = Store.open(store)
        record = s.layers[0].record_bytes
        # A profile for --pin from other prompts than the measured one.
        profile = scratch / "profile.json"
        prompts = scratch / "prompts.txt"
        prompts.write_text("\n".join(["def main(argv=None):", "class Parser(object):", "with open(name) as fh:",
                                      "if __name__ == '__main__':", "raise ValueError("]))
        subprocess.run([sys.executable, "-m", "moestream.cli", "profile", str(store), "--prompts", str(prompts),
                        "--out", str(profile), "--raw", "-n", str(args.tokens), "--cache", str(s.expert_bytes),
                        "--temperature", "1", "--seed", "1"], check=True, capture_output=True)
        configs = [("lru", "none", None, "global"), ("lru", "lookahead", None, "global"),
                   ("lfu", "none", None, "global"),
                   ("lfu", "lookahead", None, "global"), ("lru", "none", profile, "global"),
                   ("lru", "none", None, "per-layer"), ("lfu", "none", None, "per-layer")]
        for share in [float(x) for x in args.caps.split(",")]:
            cache = int(s.expert_bytes * share)
            p = probe(scratch, record, 8, seconds=2.0)
            for policy, prefetch, pin, scope in configs:
                dropped = drop_caches()
                d = one_run(store, cache, policy, prefetch, args.tokens, pin, scope)
                per_tok = d["decode_bytes_per_token"]
                ceiling = p.peak_bandwidth / per_tok if per_tok else None
                dec = d["decode"]
                row = {"share": share, "cache": cache, "scope": scope,
                       "policy": policy + ("+pin" if pin else "") + ("/layer" if scope == "per-layer" else ""),
                       "prefetch": prefetch,
                       "decode_tps": d["decode_tps"], "prefill_tps": d["prefill_tps"], "ttft": d["ttft_seconds"],
                       "hit_rate_decode": dec["hits"] / max(1, dec["hits"] + dec["misses"]),
                       "mb_per_token": per_tok / 1e6, "read_mb_s": dec["bytes_read"] / dec["wait_seconds"] / 1e6
                       if dec["wait_seconds"] else None,
                       "io_wait_share": dec["wait_seconds"] / d["decode_seconds"] if d["decode_seconds"] else 0,
                       "prefetched": dec["prefetched"], "prefetch_used": dec["prefetch_used"],
                       "peak_rss": d["peak_rss"], "probe_gb_s": p.peak_bandwidth / 1e9,
                       "io_ceiling_tps": ceiling, "page_cache_dropped": dropped}
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    result = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python benchmarks/bench_policies.py " + " ".join(sys.argv[1:]), "record_bytes": record,
              "expert_bytes": s.expert_bytes, "tokens": args.tokens, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    lines = ["## Cache policies and prefetch (decode, random demo model)", "",
             f"Machine: {result['machine']}. Date: {result['date']}. Command: `{result['command']}`. One process per "
             f"run, page cache dropped before each, O_DIRECT reads, {args.tokens} tokens sampled with a fixed seed "
             f"(identical tokens in every run). Experts: {s.expert_bytes / 1e9:.2f} GB in records of "
             f"{record / 1e6:.2f} MB. Ceiling = the same-run probe's bandwidth (depth 8) / the run's bytes per "
             "token: the I/O-only bound, compute ignored, so a ratio above 1 only means the run was not I/O-bound. "
             "A policy ending /layer ran with --cache-scope per-layer (each MoE layer an equal share of the cache).",
             "", "| cache | policy | prefetch | decode tok/s | hit rate | MB/token | read MB/s | I/O wait | "
             "prefetch used / started | ceiling tok/s | decode / ceiling | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        ceil = x["io_ceiling_tps"]
        lines.append(f"| {x['share']:.0%} ({x['cache'] / 1e6:.0f} MB) | {x['policy']} | {x['prefetch']} | "
                     f"{x['decode_tps']:.2f} | {100 * x['hit_rate_decode']:.1f} % | {x['mb_per_token']:.1f} | "
                     f"{x['read_mb_s'] or 0:.0f} | {100 * x['io_wait_share']:.0f} % | "
                     f"{x['prefetch_used']} / {x['prefetched']} | {ceil or 0:.1f} | "
                     f"{x['decode_tps'] / ceil if ceil else 0:.2f} | {x['peak_rss'] / 1e9:.2f} GB |")
    write_section(Path(args.results_md), MARK, lines)
    print(f"wrote {args.out} and {args.results_md}")


if __name__ == "__main__":
    main()
