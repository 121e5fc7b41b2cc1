"""The `moestream` command: convert, run, demo, inspect, trace, profile, simulate, plan, eval, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG_RUN = """examples:
  moestream run Qwen/Qwen3-30B-A3B --memory 8GB -p "Explain mmap in one paragraph"
  moestream run ./my-store --cache 2GB --raw -p "def quicksort(" -n 64
MODEL is a store made by `moestream convert`, or a checkpoint directory / hub id,
converted on first use into ~/.cache/moestream/stores (or $MOESTREAM_HOME)."""


def _budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory")
    g.add_argument("--memory", metavar="SIZE",
                   help="budget for the whole process, e.g. 8GB; dense weights, KV cache and buffers come out of "
                        "it, the rest caches experts (default: 80%% of available memory)")
    g.add_argument("--cache", metavar="SIZE", help="set the expert cache size directly instead of --memory")
    g.add_argument("--context", type=int, default=4096, help="tokens of KV cache to reserve (default 4096)")
    g.add_argument("--device", help="cpu, cuda or mps (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the store's)")
    g.add_argument("--threads", type=int, default=8, help="parallel expert reads in flight (default 8)")
    g.add_argument("--no-direct", action="store_true", help="read with the page cache instead of O_DIRECT")
    g.add_argument("--verify", action="store_true", help="check each expert record's checksum as it is read")
    g.add_argument("--prefetch", default="auto", choices=["none", "lookahead", "auto"],
                   help="lookahead: apply the next layer's router to this layer's input (its first four "
                        "experts before the attention, all after it), and each layer's own router to its input "
                        "before its attention, and start reading the experts they would pick (only loads; results "
                        "are unchanged); auto (default): the same, the next layer's guesses only while its cache "
                        "held, unguessed, under 90 %% of its recent requests, a layer's own only while it missed "
                        "lately")
    g.add_argument("--activations", default="float", choices=["float", "int8"],
                   help="int8: round each one-token expert's inputs to int8 per block of 32 and multiply with integer "
                        "dot products, as llama.cpp's Q4_0 x Q8_0 (LOSSY, opt-in; int4 experts with groups of 32, "
                        "CPUs with AVX-512 VNNI; an expert read from memory in 0.08 against 0.15 ms here). Default float: exact")
    g.add_argument("--pin", metavar="PROFILE", help="keep the experts a profile (`moestream profile`) found "
                                                   "hottest resident: loaded at start, never evicted")
    g.add_argument("--pin-share", type=float, default=0.5, help="share of the expert cache --pin may take "
                                                                 "(default 0.5)")
    g.add_argument("--lazy-cache", action="store_true",
                   help="allocate the expert cache as it fills instead of at load: a faster start, slower first "
                        "tokens where fresh memory is slow to come by (VMs)")
    g.add_argument("--cache-policy", default="lfu", choices=["lru", "lfu"],
                   help="which expert to evict: lfu (least frequently used, with aging; the default, measured ahead "
                        "of lru in benchmarks/RESULTS.md: when a step's experts outgrow the cache, LRU evicts each "
                        "just before its next use) or lru")
    g.add_argument("--cache-scope", default="global", choices=["global", "per-layer"],
                   help="global (the default: one budget, a layer's miss may evict any layer's expert) or per-layer "
                        "(each MoE layer an equal share; benchmarks/RESULTS.md compares them)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (default 0: off)")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--stats-json", metavar="FILE", help="also write the stats block as JSON to FILE")
    g.add_argument("--trace", metavar="FILE", help="record every layer's expert choices to FILE (.npz) for "
                                                 "`moestream simulate` and `moestream plan --trace`")


def _workload_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """What `trace` and `profile` share: where to write, and how to generate from the prompts."""
    p.add_argument("--out", required=True, metavar="FILE", help=out_help)
    p.add_argument("--raw", dest="chat", action="store_false", default=None, help="no chat template")
    _sampling_args(p)
    _budget_args(p)
    p.set_defaults(max_tokens=64)


def _machine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SSD (for predicted tok/s)")
    g.add_argument("--ssd", metavar="RATE", help="read bandwidth at the record size, e.g. 7GB/s")
    g.add_argument("--latency", type=float, default=0.0, help="ms per round of parallel reads (default 0)")
    g.add_argument("--probe", metavar="DIR", help="measure the SSD holding DIR with parallel O_DIRECT reads "
                                                  "(writes and removes a 1 GiB scratch file)")
    g.add_argument("--queue-depth", type=int, default=8, help="reads in flight (default 8, as --threads)")


def parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="moestream", description="Run Mixture-of-Experts models larger than memory: "
                                 "dense weights stay resident, experts stream from SSD through a RAM cache.")
    ap.add_argument("--version", action="version", version=f"moestream {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint or a GGUF file into a streaming store",
                       description="Split a safetensors checkpoint (or a llama.cpp GGUF file: qwen3moe, qwen2moe) "
                                   "into dense.safetensors and one file of aligned expert records per MoE layer. "
                                   "Nothing appears at OUT until it is complete.")
    c.add_argument("src", metavar="SRC", help="checkpoint directory, hub id (org/name) or .gguf file")
    c.add_argument("out", metavar="OUT", help="store directory to create")
    c.add_argument("--revision", help="hub revision (branch, tag or commit)")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.add_argument("--experts", choices=["int8", "int4", "int4z"],
                   help="LOSSY, opt-in: quantise the experts (int8 per output channel; int4 in groups along rows, "
                        "symmetric; int4z: int4 with a zero point per group), bf16 scales; default keeps the "
                        "checkpoint's dtype. `moestream eval` measures the cost")
    c.add_argument("--group", type=int, default=32, choices=[32, 64, 128], help="int4/int4z group size (default 32)")
    c.add_argument("--dense", choices=["int8", "fp8"],
                   help="int8: LOSSY, opt-in: quantise the dense nn.Linear weights (attention, dense MLPs, lm_head) to "
                        "int8 per output channel: half the resident bytes of bf16, torch's packed int8 matmul on CPU. "
                        "fp8: keep an FP8 checkpoint's dense linear weights as stored (exact; half of bf16)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="for a .gguf or quantised (FP8, MXFP4, INT4) SRC: the dtype its dense weights are dequantised "
                        "into (default bfloat16; float32 keeps them exact). Experts always keep their format")

    r = sub.add_parser("run", help="generate text from a prompt", description="Generate from MODEL, streaming "
                       "experts, and print statistics at the end.", epilog=EPILOG_RUN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("model", metavar="MODEL", nargs="?",
                   help="store, checkpoint directory or hub id (default: the bundled tiny-moe, a small "
                        "Qwen3-MoE trained on Python's standard library)")
    r.add_argument("-p", "--prompt", required=True, help="the prompt ('-' reads standard input)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the tokenizer's chat template (default when it has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="use the prompt as plain text")
    _sampling_args(r)
    _budget_args(r)

    d = sub.add_parser("demo", help="stream a bundled MoE (no download) and show the statistics",
                       description="Converts the bundled tiny-moe (a small Qwen3-MoE trained on Python's standard "
                                   "library) and writes code with an expert cache of a quarter of its experts. "
                                   "With --random: builds once a random-weight Qwen3-MoE-shaped checkpoint (~1.2 GB "
                                   "of experts) and generates with a 256 MB expert cache; its text is meaningless, "
                                   "its statistics show experts streaming at volume.")
    d.add_argument("-p", "--prompt", default="def fibonacci(n):", help="prompt (default: %(default)s)")
    d.add_argument("--random", action="store_true", help="the 1.2 GB random-weight model instead")
    d.add_argument("--rebuild", action="store_true", help="with --random: build the checkpoint and store again")
    _sampling_args(d)
    _budget_args(d)
    d.set_defaults(max_tokens=64, temperature=0.5, top_k=40, seed=0)

    t = sub.add_parser("trace", help="record which experts a model routes to, for simulate and plan",
                       description="Generate from one prompt or a file of prompts (one per line) and write the "
                                   "routing of every token in every MoE layer, with the run's timings, to a .npz.")
    t.add_argument("model", metavar="MODEL", help="store, checkpoint directory or hub id")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="one prompt")
    src.add_argument("--prompts", metavar="FILE", help="prompts, one per line; \\n in a line is a newline")
    _workload_args(t, "trace file to write (.npz)")

    pr = sub.add_parser("profile", help="count how often each expert is used, for --pin",
                        description="Count expert use per layer, from a trace (--from-trace) or by generating from "
                                    "prompts, and write a profile; `--pin PROFILE` then keeps the hottest experts "
                                    "resident.")
    pr.add_argument("model", metavar="MODEL", nargs="?", help="store, checkpoint directory or hub id")
    pr.add_argument("--prompts", metavar="FILE", help="prompts, one per line; \\n in a line is a newline")
    pr.add_argument("--from-trace", metavar="TRACE", help="count from an existing trace instead")
    pr.add_argument("-p", "--prompt", help=argparse.SUPPRESS)
    _workload_args(pr, "profile to write (.json)")

    sm = sub.add_parser("simulate", help="replay a trace through each cache policy and the optimum",
                        description="Hit rate, bytes read per token and predicted decode tok/s for each cache "
                                    "policy the runtime has, and for Belady's offline optimum (evict what is used "
                                    "furthest in the future), at one cache size or a sweep.")
    sm.add_argument("trace", metavar="TRACE", help="a .npz made by `moestream trace` or `run --trace`")
    size = sm.add_mutually_exclusive_group(required=True)
    size.add_argument("--cache", metavar="SIZE", help="expert cache size")
    size.add_argument("--memory", metavar="SIZE", help="whole-process budget, split as the traced run split it")
    size.add_argument("--sweep", action="store_true", help="ten cache sizes up to all experts")
    sm.add_argument("--policies", default="lru,lfu,belady", help="comma-separated (default: lru,lfu,belady)")
    sm.add_argument("--scopes", default="global", help="cache budget scopes, comma-separated: global, per-layer "
                                                       "(online policies; default: global)")
    sm.add_argument("--pin", metavar="PROFILE", help="also pin a profile's hottest experts (online policies)")
    sm.add_argument("--pin-share", type=float, default=0.5, help="share of the cache pinned (default 0.5)")
    _machine_args(sm)
    sm.add_argument("--plot", metavar="PNG", help="draw hit rate and predicted tok/s against cache size")
    sm.add_argument("--json", action="store_true", help="print results as JSON")

    pl = sub.add_parser("plan", help="will a model fit in this memory, and how fast will it decode",
                        description="Sizes from the model's config (nothing but config.json is downloaded), bytes "
                                    "per expert for each storage format, the memory split, expected hit rate and "
                                    "the decode speed range from the cost model.")
    pl.add_argument("model", metavar="MODEL", help="preset (e.g. deepseek-v3, qwen3-30b-a3b; see --list), store, "
                                                   "checkpoint directory, config.json, or hub id")
    budget = pl.add_mutually_exclusive_group()
    budget.add_argument("--memory", metavar="SIZE", help="whole-process budget, e.g. 32GB")
    budget.add_argument("--cache", metavar="SIZE", help="plan for this expert cache size instead")
    pl.add_argument("--experts-format", choices=["fp32", "bf16", "fp16", "fp8", "int8", "int4", "mxfp4", "fp4"],
                    help="storage format of the experts (default: the model's native one)")
    pl.add_argument("--dense-format", choices=["fp32", "bf16", "fp16", "fp8"], help="format of the dense weights")
    pl.add_argument("--context", type=int, default=4096, help="KV cache tokens to reserve (default 4096)")
    pl.add_argument("--trace", metavar="FILE", help="take the hit rate from an LRU replay of this trace")
    pl.add_argument("--compute-gbs", type=float, default=10.0,
                    help="weight bytes per second the compute reaches, in GB/s (default 10)")
    pl.add_argument("--list", action="store_true", help="list the presets and exit")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    _machine_args(pl)

    ev = sub.add_parser("eval", help="perplexity, and KL / top-1 agreement against a reference model",
                        description="Scores MODEL on a text file in windows of --window tokens: perplexity, and "
                                    "with --against REF (e.g. the exact bf16 store) the mean KL divergence "
                                    "KL(REF || MODEL) of next-token distributions and how often their top-1 agree.")
    ev.add_argument("model", metavar="MODEL", help="store, checkpoint directory or hub id")
    ev.add_argument("--text", required=True, metavar="FILE", help="text to score")
    ev.add_argument("--against", metavar="REF", help="reference model for KL and top-1 agreement")
    ev.add_argument("--window", type=int, default=256, help="tokens per forward pass (default 256)")
    ev.add_argument("--max-tokens", type=int, default=4096, help="score at most this many tokens (default 4096)")
    ev.add_argument("--json", action="store_true", help="print the scores as JSON")
    _budget_args(ev)

    i = sub.add_parser("inspect", help="describe a store, checkpoint or hub model (config only)",
                       description="For a store: its model, layers, record layout and sizes. For a checkpoint "
                                   "directory, hub id (only config.json is downloaded) or preset: the family, MoE "
                                   "layers, experts, top-k, shared experts, dense bytes, bytes per stored expert, "
                                   "the weights' format and whether moestream can stream it.")
    i.add_argument("store", metavar="MODEL", help="store, checkpoint directory, hub id or preset")
    i.add_argument("--json", action="store_true", help="print store.json's summary as JSON")

    sv = sub.add_parser("serve", help="serve a model over OpenAI- and Anthropic-compatible HTTP",
                        description="Serve MODEL on /v1/chat/completions, /v1/completions and /v1/messages (SSE "
                                    "streaming or not), /v1/models, /health and /metrics (Prometheus). Concurrent "
                                    "requests decode as one batch, so each expert read serves all of them. KV "
                                    "for --max-batch sequences of --context tokens comes out of --memory.",
                        epilog="example:\n  moestream serve Qwen/Qwen3-30B-A3B --memory 16GB --port 8080\n"
                               "  curl localhost:8080/v1/chat/completions -H 'content-type: application/json' \\\n"
                               "    -d '{\"model\": \"Qwen/Qwen3-30B-A3B\", \"messages\": [{\"role\": \"user\", "
                               "\"content\": \"hi\"}]}'",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sv.add_argument("model", metavar="MODEL", nargs="?",
                    help="store, checkpoint directory or hub id (default: the bundled tiny-moe)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    sv.add_argument("--api-key", default=os.environ.get("MOESTREAM_API_KEY"),
                    help="require this key (Authorization: Bearer KEY, or x-api-key) on every endpoint but "
                         "/health (default: $MOESTREAM_API_KEY; none: open)")
    sv.add_argument("--name", help="model name clients send (default: MODEL as given, or the store's name)")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    sv.add_argument("--max-queue", type=int, default=32,
                    help="requests waiting for a slot before new ones get 429 (default 32)")
    sv.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default warning; info logs every request)")
    _budget_args(sv)
    return ap


def _run(args, model_path: str, chat) -> int:
    from .runtime import load

    cache = args.cache
    if cache is None and args.memory is None and args.command == "demo":
        from .store import Store

        cache = "256MB" if args.random else Store.open(model_path).expert_bytes // 4
    m = load(model_path, memory=args.memory, cache=cache, device=args.device, dtype=args.dtype,
             verify=args.verify, threads=args.threads, direct=not args.no_direct, context=args.context,
             cache_policy=args.cache_policy, cache_scope=args.cache_scope, trace=bool(args.trace),
             prefetch=args.prefetch, pin=args.pin, pin_share=args.pin_share, activations=args.activations,
             reserve=not args.lazy_cache)
    try:
        if m.reader.fallback_reason:
            print(f"note: buffered reads: {m.reader.fallback_reason}", file=sys.stderr)
        print(f"{m.store.root.name}: {m.memory.describe()}", file=sys.stderr)
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if m.tokenizer is not None and not m.chat_mode(chat):
            sys.stdout.write(prompt)  # raw mode continues the prompt: show it
        for piece in m.stream(prompt, max_new_tokens=args.max_tokens, chat=chat, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, seed=args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(m.stats.format(), file=sys.stderr)
        if args.stats_json:
            Path(args.stats_json).write_text(json.dumps(m.stats.to_dict(), indent=1))
        if args.trace:
            print(f"trace: {m.save_trace(args.trace)}", file=sys.stderr)
    finally:
        m.close()
    return 0


def _serve(args) -> int:
    import uvicorn

    from .batch import Engine
    from .demo import bundled_model
    from .runtime import load
    from .server import Server, create_app

    path = args.model or str(bundled_model())
    m = load(path, memory=args.memory, cache=args.cache, device=args.device, dtype=args.dtype, verify=args.verify,
             threads=args.threads, direct=not args.no_direct, context=args.context, cache_policy=args.cache_policy,
             cache_scope=args.cache_scope, prefetch=args.prefetch, pin=args.pin, pin_share=args.pin_share,
             activations=args.activations, sequences=args.max_batch, reserve=not args.lazy_cache)
    engine = Engine(m, max_batch=args.max_batch, max_queue=args.max_queue)
    try:
        from .stores import is_hub_id

        name = args.name or (args.model if args.model and is_hub_id(args.model) else Path(path).name)
        if m.reader.fallback_reason:
            print(f"note: buffered reads: {m.reader.fallback_reason}", file=sys.stderr)
        if not engine.can_batch:
            print(f"note: {m.store.meta['model_type']} has sliding-window or linear-attention layers: requests are "
                  "decoded one at a time", file=sys.stderr)
        print(f"{m.store.root.name}: {m.memory.describe()}", file=sys.stderr)
        print(f"serving '{name}' on http://{args.host}:{args.port}/v1 (batch {engine.max_batch}, queue "
              f"{args.max_queue}{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
        app = create_app(Server(engine, name, args.context, args.api_key))
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.close()
        m.close()
    return 0


def _profile(args) -> int:
    import tempfile

    from .profile import profile_from_trace, save_profile
    from .trace import Trace

    if args.from_trace:
        trace = Trace.load(args.from_trace)
    else:
        if not (args.model and args.prompts):
            raise ValueError("give MODEL and --prompts FILE, or --from-trace TRACE")
        with tempfile.TemporaryDirectory() as d:
            args.out_trace = str(Path(d) / "t.npz")
            _trace(args, args.out_trace)
            trace = Trace.load(args.out_trace)
    p = profile_from_trace(trace)
    save_profile(p, args.out)
    print(f"wrote {args.out}: {p['tokens']} tokens over {len(p['counts'])} MoE layers")
    return 0


def _trace(args, out: str | None = None) -> int:
    from .runtime import load

    prompts = [args.prompt] if args.prompt else [
        line.replace("\\n", "\n").replace("\\t", "\t")
        for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts in the file")
    m = load(args.model, memory=args.memory, cache=args.cache, device=args.device, dtype=args.dtype,
             verify=args.verify, threads=args.threads, direct=not args.no_direct, context=args.context,
             cache_policy=args.cache_policy, cache_scope=args.cache_scope, trace=True, prefetch=args.prefetch,
             pin=args.pin, pin_share=args.pin_share, activations=args.activations, reserve=not args.lazy_cache)
    out = out or args.out
    try:
        from tqdm import tqdm

        for p in tqdm(prompts, desc="trace", unit="prompt", disable=len(prompts) < 2):
            for _ in m.stream_ids(p, max_new_tokens=args.max_tokens, chat=args.chat, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed):
                pass
        path = m.save_trace(out)
        t = m.cache.total()
        print(f"wrote {path}: {len(prompts)} prompt(s), hit rate {100 * t.hit_rate:.1f} % at "
              f"{m.cache.budget / 1e6:.0f} MB ({m.cache.policy.name})")
    finally:
        m.close()
    return 0


def _machine(args, record_bytes: int, fallback=None):
    """The cost model's SSD figures: probed, stated, or (for a trace) as observed in the traced run."""
    from .costmodel import Machine
    from .sizes import parse_size

    if args.probe:
        from .probe import probe

        p = probe(args.probe, record_bytes, args.queue_depth)
        return Machine(p.bandwidth, p.latency, args.queue_depth, source=p.describe())
    if args.ssd:
        return Machine(parse_size(args.ssd.replace("/s", ""), "--ssd"), args.latency / 1e3, args.queue_depth,
                       source="--ssd")
    return fallback


def _simulate(args) -> int:
    from .costmodel import Machine
    from .simulate import plot, simulate, sweep_sizes
    from .sizes import format_size, parse_size
    from .trace import Trace

    t = Trace.load(args.trace)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    record_bytes = [int(b) for b in t.record_bytes]
    timing = t.decode_timing() or {"compute": 0.0, "bandwidth": None}
    compute = timing["compute"]
    observed = None
    if timing["bandwidth"]:
        observed = Machine(timing["bandwidth"], 0.0, t.meta.get("threads", 8), compute,
                           source="per-read throughput in the traced run, conservative; --probe DIR measures")
    machine = _machine(args, max(record_bytes), observed)
    if machine is not None:
        machine.compute = compute
    if args.sweep:
        sizes = sweep_sizes(t)
    elif args.cache:
        sizes = [parse_size(args.cache, "--cache")]
    else:
        plan = t.meta.get("memory_plan") or {}
        if plan.get("memory") is None:
            raise ValueError(f"{args.trace}: the traced run had no --memory split; use --cache")
        fixed = plan["baseline"] + plan["dense"] + plan["kv"] + plan["work"]
        sizes = [parse_size(args.memory, "--memory") - fixed]
    pin = None
    if args.pin:
        from .profile import hottest, load_profile

        prof = load_profile(args.pin)
        rb = {int(l): int(b) for l, b in zip(t.layers, t.record_bytes)}
        pin = {size: hottest(prof, int(size * args.pin_share), rb) for size in sizes}
    scopes = [c.strip() for c in args.scopes.split(",") if c.strip()]
    results = [simulate(t, size, p, pin[size] if pin else None, scope) for scope in scopes for p in policies
               if scope == "global" or p != "belady" for size in sizes]
    if args.json:
        out = [{**r.to_dict(), "predicted_tps": r.predicted_tps(machine, record_bytes) if machine else None}
               for r in results]
        print(json.dumps(out, indent=1))
    else:
        print(f"{args.trace}: {len(t.layers)} MoE layers, {int(t.num_experts[0])} experts, top-{t.top_k}, "
              f"{int(t.step_tokens.sum())} tokens ({t.decode_tokens} decoded)")
        if machine:
            print(f"cost model: SSD {machine.bandwidth / 1e9:.2f} GB/s ({machine.source}), "
                  f"compute {machine.compute * 1e3:.1f} ms/token (measured in the traced run)")
        print(f"{'policy':<10} {'cache':>10} {'hit rate':>9} {'GB read':>9} {'MB/token':>9} {'pred tok/s':>10}")
        for r in results:
            tps = f"{r.predicted_tps(machine, record_bytes):10.2f}" if machine else f"{'-':>10}"
            print(f"{r.policy:<10} {format_size(r.cache_bytes):>10} {100 * r.hit_rate:8.1f}% "
                  f"{r.bytes_read / 1e9:9.3f} {r.decode_bytes_per_token / 1e6:9.2f} {tps}")
    if args.plot:
        plot(results, args.plot, machine, record_bytes)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def _plan(args) -> int:
    from .plan import make_plan
    from .presets import PRESETS

    if args.list:
        for name, p in PRESETS.items():
            print(f"{name:<20} {p.hub_id:<32} experts {p.experts_format:<6} {p.card}")
        return 0
    plan = make_plan(args.model, args.memory, ssd=args.ssd, probe_dir=args.probe, experts_format=args.experts_format,
                     dense_format=args.dense_format, context=args.context, trace=args.trace,
                     compute_gbs=args.compute_gbs, queue_depth=args.queue_depth, latency=args.latency / 1e3,
                     cache=args.cache)
    print(json.dumps(plan.to_dict(), indent=1, default=str) if args.json else plan.format())
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate
    from .runtime import load

    opts = dict(memory=args.memory, cache=args.cache, device=args.device, dtype=args.dtype, verify=args.verify,
                threads=args.threads, direct=not args.no_direct, context=args.window, reserve=not args.lazy_cache)
    text = Path(args.text).read_text()
    with load(args.model, **opts) as m:
        ref = load(args.against, **opts) if args.against else None
        try:
            scores = evaluate(m, text, ref, window=args.window, max_tokens=args.max_tokens)
        finally:
            if ref is not None:
                ref.close()
    if args.json:
        print(json.dumps(scores, indent=1))
    else:
        print(f"{scores['model']} ({scores['experts_format']}): {scores['tokens']} tokens, perplexity "
              f"{scores['perplexity']:.3f}")
        if "kl" in scores:
            print(f"against {scores['against']} ({scores['against_format']}): mean KL {scores['kl']:.5f} nats, "
                  f"top-1 agreement {100 * scores['top1_agreement']:.2f} %, reference perplexity "
                  f"{scores['against_perplexity']:.3f}")
    return 0


def _inspect_model(args) -> int:
    """A model that is not a store: sizes from its config, and whether it can be streamed."""
    from .plan import resolve_model
    from .sizes import format_size
    from .skeleton import UnsupportedModel, check_weights_supported

    r = resolve_model(args.store)
    size = r.size
    fmt = r.native_experts
    try:
        check_weights_supported(size.config, args.store)
        supported, why = True, (f"yes: experts streamed as stored ({fmt}), dense dequantised from {r.native_dense} "
                                "at convert (--dtype)" if fmt not in ("bf16", "fp16", "fp32")
                                else "yes: streamed exactly from its bf16/fp16/fp32 weights")
    except UnsupportedModel as e:
        supported, why = False, f"no: {e}"
    summary = {"model": size.name, "model_type": size.model_type, "source": r.source,
               "parameters": size.total_params, "dense_parameters": size.dense_params, "moe_layers": size.moe_layers,
               "experts": size.experts, "top_k": size.top_k, "shared_experts": size.shared_experts,
               "expert_parameters": size.expert_params, "experts_format": fmt, "dense_format": r.native_dense,
               "dense_bytes": size.dense_bytes(r.native_dense), "expert_bytes": size.expert_bytes(fmt),
               "supported": supported, "why": why}
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{size.name} ({size.model_type}), from {r.source}")
    print(f"  parameters    {size.total_params / 1e9:.2f} B: dense {size.dense_params / 1e9:.2f} B, "
          f"{size.moe_layers} MoE layers x {size.experts} experts of {size.expert_params / 1e6:.2f} M, top-{size.top_k}"
          + (f", {size.shared_experts} shared" if size.shared_experts else ""))
    print(f"  dense         {format_size(summary['dense_bytes'])} as {r.native_dense}")
    print(f"  experts       {format_size(summary['expert_bytes'])} per stored expert as {fmt}, "
          f"{format_size(summary['expert_bytes'] * size.moe_layers * size.experts)} in all")
    print(f"  supported     {why}")
    return 0


def _inspect_gguf(args) -> int:
    from .gguf_import import describe_gguf
    from .sizes import format_size

    d = describe_gguf(Path(args.store))
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    types = lambda by: ", ".join(f"{k} {format_size(v)}" for k, v in sorted(by.items()))  # noqa: E731
    print(f"{d['file']}\n  model         {d['name'] or '?'} (GGUF architecture {d['architecture']})")
    print(f"  layers        {d['layers']}, {d['moe_layers']} MoE layers x {d['experts']} experts, top-{d['top_k']}"
          + (f", shared expert ({d['shared_expert_ff']})" if d["shared_expert_ff"] else ""))
    print(f"  dense         {types(d['dense_bytes_by_type'])}")
    print(f"  experts       {types(d['expert_bytes_by_type'])}; {format_size(d['bytes_per_expert'])} per expert")
    print(f"  supported     {d['why']}")
    return 0


def _inspect(args) -> int:
    from .sizes import format_size
    from .store import STORE_JSON, Store

    if args.store.endswith(".gguf"):
        return _inspect_gguf(args)
    if not (Path(args.store).expanduser() / STORE_JSON).is_file():
        return _inspect_model(args)
    s = Store.open(args.store)
    summary = {
        "store": str(s.root), "model_type": s.meta["model_type"], "architecture": s.meta["architecture"],
        "dtype": s.meta["dtype"], "quant": s.meta["quant"], "source": s.meta["source"]["model"],
        "dense_bytes": s.dense_bytes, "expert_bytes": s.expert_bytes, "moe_layers": len(s.layers),
        "experts_per_layer": sorted({i.experts for i in s.layers}),
        "record_bytes": sorted({i.record_bytes for i in s.layers}),
        "record_layout": [t.__dict__ for t in s.layers[0].tensors] if s.layers else [],
    }
    if args.json:
        print(json.dumps(summary, indent=1, default=list))
        return 0
    print(f"{s.root}\n  model         {summary['architecture']} ({summary['model_type']}), from {summary['source']}")
    q = s.meta["quant"]["experts"]
    lossy = s.meta["quant"].get("lossy", q in ("int8_channel",) or q.startswith("int4_g"))
    print(f"  dtype         {summary['dtype']}, experts format: {q}" + (
        " (as quantised in the GGUF file)" if q.startswith("gguf") else " (LOSSY: quantised by moestream convert)"
        if lossy else " (exact: as the source stores them)"))
    dq = s.meta["quant"].get("dense", "none")
    if dq != "none":
        print(f"  dense format  {dq}" + (" (exact: as the source stores them)" if dq.startswith("fp8") else " (LOSSY)"))
    if s.meta["quant"].get("dense_source"):
        print(f"  dense source  {s.meta['quant']['dense_source']}")
    print(f"  dense         {format_size(s.dense_bytes)} resident (dense.safetensors)")
    print(f"  experts       {format_size(s.expert_bytes)} in {len(s.layers)} MoE layers x "
          f"{summary['experts_per_layer']} experts, record {summary['record_bytes']} bytes")
    for t in summary["record_layout"]:
        print(f"    {t['name']:<18} {t['dtype']:<9} {str(list(t['shape'])):<16} offset {t['offset']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .budget import MemoryBudgetError
    from .reader import RecordCorrupt
    from .safetensors_io import CheckpointError
    from .skeleton import UnsupportedModel
    from .store import StoreError
    from .profile import ProfileError
    from .trace import TraceError

    args = parser().parse_args(argv)
    try:
        if args.command == "convert":
            import torch

            from .convert import convert

            out = convert(args.src, args.out, force=args.force, revision=args.revision, experts=args.experts,
                          group=args.group, dtype=getattr(torch, args.dtype) if args.dtype else None,
                          dense=args.dense)
            print(f"wrote {out}")
            return 0
        if args.command == "run":
            from .demo import bundled_model

            return _run(args, args.model or str(bundled_model()), args.chat)
        if args.command == "demo":
            from .demo import bundled_model, ensure_random_store
            from .stores import ensure_store

            store = ensure_random_store(rebuild=args.rebuild) if args.random else ensure_store(str(bundled_model())).root
            return _run(args, str(store), False)
        handlers = {"inspect": _inspect, "trace": _trace, "simulate": _simulate, "plan": _plan, "eval": _eval,
                    "profile": _profile, "serve": _serve}
        return handlers[args.command](args)
    except (UnsupportedModel, CheckpointError, StoreError, RecordCorrupt, MemoryBudgetError, FileExistsError,
            FileNotFoundError, TraceError, ProfileError, MemoryError, ValueError) as e:
        print(f"moestream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmoestream: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
