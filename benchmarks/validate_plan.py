"""Does the planner's prediction hold? Predicted vs measured decode tok/s at several expert-cache sizes.

Builds (once, under --scratch) a random Qwen3-MoE-shaped checkpoint, converts it, records a routing
trace and the compute time per token with every expert cached, probes the SSD at the record size in
the same run, then for each cache size:
  predicted (trace)   = the simulator's LRU replay of the trace through the cost model
  predicted (uniform) = what `moestream plan` says without a trace (hit rate = share cached)
  measured            = a real run at that cache size on the same prompts and seed
and writes the error table to JSON and to benchmarks/RESULTS.md. Not a test: it takes minutes.

    python benchmarks/validate_plan.py --scratch /tmp/moestream-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import moestream
from common import drop_caches, machine_description, synthetic_store, write_section
from moestream.costmodel import Machine
from moestream.demo import DEMO_SHAPE
from moestream.plan import make_plan
from moestream.probe import probe
from moestream.simulate import simulate
from moestream.store import Store
from moestream.trace import Trace

# Measured runs use MEASURED; the held-out prediction comes from a trace of TRACED only.
MEASURED = ["def parse(path):", "import collections\nclass Cache:", "for i, line in enumerate(f):",
            "try:\n    import numpy", "@dataclass\nclass Point:", "while queue:\n    node ="]
TRACED = ["class Parser(object):", "def main(argv=None):", "with open(name) as fh:",
          "if __name__ == '__main__':", "return sorted(items, key=", "raise ValueError("]
MARK = "<!-- validate_plan -->"


def run(store: Path, cache: int, tokens: int, prompts: list[str], trace: Path | None = None) -> dict:
    """Generate from every prompt at this cache size; decode totals across prompts."""
    with moestream.load(store, cache=cache, device="cpu", trace=trace is not None, progress=False) as m:
        dec_tokens = dec_time = wait = read = 0
        for p in prompts:
            list(m.stream_ids(p, max_new_tokens=tokens, chat=False, stop_at_eos=False, temperature=1.0, seed=0))
            s = m.stats
            dec_tokens += s.generated_tokens - 1
            dec_time += s.decode_seconds
            wait += s.decode.wait_seconds
            read += s.decode.bytes_read
        if trace:
            m.save_trace(trace)
        total = m.cache.total()
    return {"cache": cache, "decode_tokens": dec_tokens, "decode_seconds": dec_time, "decode_tps": dec_tokens / dec_time,
            "decode_wait_seconds": wait, "decode_bytes": read, "hit_rate": total.hit_rate,
            "compute_per_token": (dec_time - wait) / dec_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scratch", default="scratch/validate_plan", help="folder for the checkpoint and store")
    ap.add_argument("--caps", default="0.1,0.2,0.35,0.5,0.75", help="cache sizes as shares of all experts")
    ap.add_argument("--tokens", type=int, default=24, help="tokens per prompt")
    ap.add_argument("--out", default="benchmarks/results/validate_plan.json")
    ap.add_argument("--results-md", default="benchmarks/RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder afterwards")
    args = ap.parse_args()

    scratch = Path(args.scratch)
    t0 = time.time()
    try:
        store = synthetic_store(scratch)
        s = Store.open(store)
        record = s.layers[0].record_bytes
        total = s.expert_bytes

        # Calibration with every expert cached: compute time per token, and the routing of both prompt sets.
        run(store, total, args.tokens, MEASURED)  # warm-up: imports, allocator
        calib = run(store, total, args.tokens, MEASURED, trace=scratch / "same.npz")
        run(store, total, args.tokens, TRACED, trace=scratch / "heldout.npz")
        same, heldout = Trace.load(scratch / "same.npz"), Trace.load(scratch / "heldout.npz")
        probe_before = probe(scratch, record, 8, seconds=3.0)
        sizes = [int(b) for b in same.record_bytes]

        rows = []
        for share in [float(x) for x in args.caps.split(",")]:
            cache = max(record * 8, int(total * share))
            dropped = drop_caches()
            measured = run(store, cache, args.tokens, MEASURED)
            machine = Machine(probe_before.bandwidth, probe_before.latency, 8, calib["compute_per_token"],
                              source=probe_before.describe())
            sim = simulate(same, cache, "lru")
            pred_trace = sim.predicted_tps(machine, sizes)
            sim_held = simulate(heldout, cache, "lru")
            pred_held = sim_held.predicted_tps(machine, sizes)
            plan = make_plan(str(store), cache=cache, ssd=probe_before.bandwidth, latency=probe_before.latency,
                             trace=str(scratch / "heldout.npz"))
            hit_uniform = (cache // record) / (len(s.layers) * s.layers[0].experts)
            miss = same.top_k * (1 - hit_uniform)
            io = machine.io_seconds([miss] * len(s.layers), [record] * len(s.layers))
            pred_uniform = 1 / (machine.compute + io)
            rows.append({"share": share, "cache": cache, "measured_tps": measured["decode_tps"],
                         "predicted_trace_tps": pred_trace, "predicted_heldout_tps": pred_held,
                         "predicted_uniform_tps": pred_uniform, "predicted_plan_tps": plan.tps_with_compute,
                         "error_plan": plan.tps_with_compute / measured["decode_tps"] - 1,
                         "error_trace": pred_trace / measured["decode_tps"] - 1,
                         "error_heldout": pred_held / measured["decode_tps"] - 1,
                         "hit_rate_heldout": sim_held.hit_rate,
                         "error_uniform": pred_uniform / measured["decode_tps"] - 1,
                         "hit_rate_measured": measured["hit_rate"], "hit_rate_simulated": sim.hit_rate,
                         "hit_rate_uniform": hit_uniform,
                         "decode_mb_per_token_measured": measured["decode_bytes"] / measured["decode_tokens"] / 1e6,
                         "decode_mb_per_token_simulated": sim.decode_bytes_per_token / 1e6,
                         "read_mb_s_measured": measured["decode_bytes"] / measured["decode_wait_seconds"] / 1e6
                         if measured["decode_wait_seconds"] else None, "page_cache_dropped": dropped})
            print(f"cache {share:5.0%}: measured {measured['decode_tps']:6.2f} tok/s, predicted {pred_trace:6.2f} "
                  f"(trace, {100 * rows[-1]['error_trace']:+.0f} %), {pred_held:6.2f} (held-out trace, "
                  f"{100 * rows[-1]['error_heldout']:+.0f} %), {plan.tps_with_compute:6.2f} (plan --trace, "
                  f"{100 * rows[-1]['error_plan']:+.0f} %), {pred_uniform:6.2f} (uniform, "
                  f"{100 * rows[-1]['error_uniform']:+.0f} %); hit {100 * measured['hit_rate']:.1f} % measured, "
                  f"{100 * sim.hit_rate:.1f} % simulated", flush=True)
        probe_after = probe(scratch, record, 8, seconds=3.0)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    result = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python benchmarks/validate_plan.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                        for k, v in vars(args).items() if v not in (False, None)),
              "shape": DEMO_SHAPE, "record_bytes": record, "expert_bytes": total, "prompts": len(MEASURED),
              "tokens_per_prompt": args.tokens, "calibration": calib, "probe_before": probe_before.__dict__,
              "probe_after": probe_after.__dict__, "rows": rows, "seconds": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    write_markdown(result, Path(args.results_md))
    print(f"wrote {args.out} and {args.results_md}")


def write_markdown(r: dict, path: Path) -> None:
    lines = ["## Planner validation: predicted vs measured decode speed", "",
             f"Machine: {r['machine']}. Date: {r['date']}. Command: `{r['command']}`.", "",
             f"Model: random Qwen3-MoE shape {r['shape']['num_hidden_layers']} layers x "
             f"{r['shape']['num_experts']} experts (top-{r['shape']['num_experts_per_tok']}), bf16 records of "
             f"{r['record_bytes'] / 1e6:.2f} MB, {r['expert_bytes'] / 1e9:.2f} GB of experts; {r['prompts']} prompts x "
             f"{r['tokens_per_prompt']} tokens, sampled with a fixed seed (same routing in every run).",
             f"Compute per token with every expert cached: {r['calibration']['compute_per_token'] * 1e3:.1f} ms. "
             f"SSD probe (O_DIRECT, record size, depth 8) before: {r['probe_before']['bandwidth'] / 1e9:.2f} GB/s, "
             f"r = {r['probe_before']['latency'] * 1e3:.2f} ms; after: {r['probe_after']['bandwidth'] / 1e9:.2f} GB/s.",
             "", "| expert cache | measured tok/s | predicted (same-prompt trace) | error | predicted (held-out trace) "
             "| error | `plan --trace` (held-out) | error | predicted (uniform) | error | hit rate measured / same / "
             "held-out / uniform | MB read per token measured / simulated |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['share']:.0%} ({x['cache'] / 1e6:.0f} MB) | {x['measured_tps']:.2f} | "
                     f"{x['predicted_trace_tps']:.2f} | {100 * x['error_trace']:+.0f} % | "
                     f"{x['predicted_heldout_tps']:.2f} | {100 * x['error_heldout']:+.0f} % | "
                     f"{x['predicted_plan_tps']:.2f} | {100 * x['error_plan']:+.0f} % | "
                     f"{x['predicted_uniform_tps']:.2f} | {100 * x['error_uniform']:+.0f} % | "
                     f"{100 * x['hit_rate_measured']:.1f} / {100 * x['hit_rate_simulated']:.1f} / "
                     f"{100 * x['hit_rate_heldout']:.1f} / {100 * x['hit_rate_uniform']:.1f} % | "
                     f"{x['decode_mb_per_token_measured']:.1f} / "
                     f"{x['decode_mb_per_token_simulated']:.1f} |")
    lines += ["", "predicted (same-prompt trace): `moestream simulate` on a trace of the measured prompts (so the hit "
              "rate is exact and the error is the cost model's), with the probe's B and r and the compute time "
              "measured with all experts cached. predicted (held-out trace): the same from a trace of six other "
              "prompts, as a user would plan from a trace of their own workload. `plan --trace`: `moestream plan STORE --cache C "
              "--ssd B --latency r --trace heldout.npz`, which uses the replay's mean hit rate for every layer and "
              "token and the compute time measured in that trace. predicted (uniform): `moestream "
              "plan` without a trace (hit rate = share of experts cached). Error = predicted / measured - 1. "
              "Reads are O_DIRECT; predictions take o = 0 (no I/O hidden behind compute)."]
    write_section(path, MARK, lines)


if __name__ == "__main__":
    main()
