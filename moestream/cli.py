"""The `moestream` command: convert, run, demo, inspect."""

from __future__ import annotations

import argparse
import json
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


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (default 0: off)")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--stats-json", metavar="FILE", help="also write the stats block as JSON to FILE")


def parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="moestream", description="Run Mixture-of-Experts models larger than memory: "
                                 "dense weights stay resident, experts stream from SSD through a RAM cache.")
    ap.add_argument("--version", action="version", version=f"moestream {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint into a streaming store",
                       description="Split a safetensors checkpoint into dense.safetensors and one file of aligned "
                                   "expert records per MoE layer. Nothing appears at OUT until it is complete.")
    c.add_argument("src", metavar="SRC", help="checkpoint directory or hub id (org/name)")
    c.add_argument("out", metavar="OUT", help="store directory to create")
    c.add_argument("--revision", help="hub revision (branch, tag or commit)")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")

    r = sub.add_parser("run", help="generate text from a prompt", description="Generate from MODEL, streaming "
                       "experts, and print statistics at the end.", epilog=EPILOG_RUN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("model", metavar="MODEL", help="store, checkpoint directory or hub id")
    r.add_argument("-p", "--prompt", required=True, help="the prompt ('-' reads standard input)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the tokenizer's chat template (default when it has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="use the prompt as plain text")
    _sampling_args(r)
    _budget_args(r)

    d = sub.add_parser("demo", help="stream a built-in random MoE (no download) and show the statistics",
                       description="Builds once a random-weight Qwen3-MoE-shaped checkpoint (~1.2 GB of experts), "
                                   "converts it, and generates with a 256 MB expert cache. The text is "
                                   "meaningless (random weights); the statistics show experts streaming.")
    d.add_argument("-p", "--prompt", default="def fibonacci(n):", help="prompt (default: %(default)s)")
    d.add_argument("--rebuild", action="store_true", help="build the demo checkpoint and store again")
    _sampling_args(d)
    _budget_args(d)
    d.set_defaults(max_tokens=32, cache_default="256MB")

    i = sub.add_parser("inspect", help="describe a store", description="Print a store's model, layers, "
                       "record layout and sizes.")
    i.add_argument("store", metavar="STORE", help="store directory")
    i.add_argument("--json", action="store_true", help="print store.json's summary as JSON")
    return ap


def _run(args, model_path: str, chat) -> int:
    from .runtime import load

    cache = args.cache
    if cache is None and args.memory is None:
        cache = getattr(args, "cache_default", None)
    m = load(model_path, memory=args.memory, cache=cache, device=args.device, dtype=args.dtype,
             verify=args.verify, threads=args.threads, direct=not args.no_direct, context=args.context)
    try:
        if m.reader.fallback_reason:
            print(f"note: buffered reads: {m.reader.fallback_reason}", file=sys.stderr)
        print(f"{m.store.root.name}: {m.memory.describe()}", file=sys.stderr)
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if m.tokenizer is not None:
            sys.stdout.write(prompt if chat is False else "")
        for piece in m.stream(prompt, max_new_tokens=args.max_tokens, chat=chat, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, seed=args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(m.stats.format(), file=sys.stderr)
        if args.stats_json:
            Path(args.stats_json).write_text(json.dumps(m.stats.to_dict(), indent=1))
    finally:
        m.close()
    return 0


def _inspect(args) -> int:
    from .sizes import format_size
    from .store import Store

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
    print(f"  dtype         {summary['dtype']}, experts quantisation: {s.meta['quant']['experts']}")
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

    args = parser().parse_args(argv)
    try:
        if args.command == "convert":
            from .convert import convert

            out = convert(args.src, args.out, force=args.force, revision=args.revision)
            print(f"wrote {out}")
            return 0
        if args.command == "run":
            return _run(args, args.model, args.chat)
        if args.command == "demo":
            from .demo import ensure_demo_store

            return _run(args, str(ensure_demo_store(rebuild=args.rebuild)), False)
        if args.command == "inspect":
            return _inspect(args)
    except (UnsupportedModel, CheckpointError, StoreError, RecordCorrupt, MemoryBudgetError, FileExistsError,
            ValueError) as e:
        print(f"moestream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmoestream: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
