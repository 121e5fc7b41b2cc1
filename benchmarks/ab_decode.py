"""Settings compared inside one decode, so the disk's drift hits them alike.

The disk of this project's VMs drifts by tens of per cent from minute to minute (1.2-2.4 GB/s within one session),
so two settings run in separate processes differ by more than the settings do. Here one decode switches settings
every --block tokens; it runs once per setting with the order rotated, so each setting sees every token once
(sampling is seeded: without the rotation a setting would always get the same tokens, and tokens differ in what
they read). Each rotation runs in a process of its own; the table sums them.

A setting is one or more assignments to moestream module constants that are read where they are used, e.g.
`runtime.AUTO_PREFETCH_BELOW=0.6` or `runtime.EARLY_NEXT=0,runtime.AUTO_OWN_BELOW=0`. Not a test.

    python benchmarks/ab_decode.py --store /tmp/bd3/store-emb8 --memory 6GiB \\
        --set runtime.AUTO_PREFETCH_BELOW=0.6 --set runtime.AUTO_PREFETCH_BELOW=0.9
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_decode import PROMPT  # the prompt bench_decode's rows decode
from common import machine_description

FIELDS = ("seconds", "tokens", "bytes_read", "busy_seconds", "wait_seconds")


def parse_setting(text: str) -> list[tuple[object, str, object]]:
    """(module, constant, value) for each `module.CONSTANT=value` of one --set; a clear error for anything else."""
    out = []
    for part in text.split(","):
        name, eq, value = part.partition("=")
        mod_name, _, const = name.strip().rpartition(".")
        if not eq or not mod_name or not const:
            raise SystemExit(f"--set {text!r}: write module.CONSTANT=value, e.g. runtime.AUTO_PREFETCH_BELOW=0.6")
        try:
            module = importlib.import_module(f"moestream.{mod_name}")
        except ImportError:
            raise SystemExit(f"--set {text!r}: there is no module moestream.{mod_name}") from None
        if not const.isupper() or not hasattr(module, const):
            raise SystemExit(f"--set {text!r}: moestream.{mod_name} has no constant {const}")
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise SystemExit(f"--set {text!r}: {value.strip()!r} is not a Python literal") from None
        out.append((module, const, parsed))
    return out


def child(args: argparse.Namespace) -> None:
    """One rotation: decode, switching settings every --block tokens, and write each setting's sums as JSON."""
    import moestream

    settings = [parse_setting(s) for s in args.set]
    totals = {s: dict.fromkeys(FIELDS, 0.0) for s in args.set}
    with moestream.load(args.store, memory=args.memory, prefetch=args.prefetch, progress=False) as m:
        last = name = None
        stream = m.stream_ids(args.prompt, args.tokens, chat=False, stop_at_eos=False, temperature=args.temperature,
                              seed=0)
        for i, _ in enumerate(stream):
            now, io, busy = time.perf_counter(), m.cache.total(), m.reader.busy_seconds()
            if last is not None and i > args.block:  # the first block follows the prefill: left out
                t = totals[name]
                t["seconds"] += now - last[0]
                t["tokens"] += 1
                t["bytes_read"] += io.bytes_read - last[1].bytes_read
                t["busy_seconds"] += busy - last[2]
                t["wait_seconds"] += io.wait_seconds - last[1].wait_seconds
            k = (i // args.block + args.rotation) % len(settings)
            name = args.set[k]
            for module, const, value in settings[k]:
                setattr(module, const, value)
            last = (time.perf_counter(), m.cache.total(), m.reader.busy_seconds())
    Path(args.child_out).write_text(json.dumps(totals))


def summary(sums: dict) -> str:
    s = sums
    return (f"{s['tokens'] / s['seconds']:.2f} | {s['bytes_read'] / s['tokens'] / 1e6:.1f} | "
            f"{100 * s['busy_seconds'] / s['seconds']:.0f} % | {1e3 * s['wait_seconds'] / s['tokens']:.1f} | "
            f"{s['bytes_read'] / s['busy_seconds'] / 1e9 if s['busy_seconds'] else 0:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="a moestream store, e.g. bench_decode's (--keep)")
    ap.add_argument("--memory", default="6GiB", help="the process's budget, as `moestream run --memory`")
    ap.add_argument("--set", action="append", required=True,
                    help="one setting: module.CONSTANT=value[,module.CONSTANT=value...]; give two or more")
    ap.add_argument("--tokens", type=int, default=120, help="tokens decoded per rotation")
    ap.add_argument("--block", type=int, default=4, help="tokens per setting before switching")
    ap.add_argument("--prefetch", default="auto", choices=["none", "lookahead", "auto"])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--out", help="JSON results (default: none)")
    ap.add_argument("--rotation", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if len(args.set) < 2 or len(set(args.set)) != len(args.set):
        raise SystemExit("--set: give two or more different settings")
    if args.block < 1 or args.tokens <= 2 * args.block * len(args.set):
        raise SystemExit(f"--tokens {args.tokens} leaves no room for two blocks of {args.block} per setting")
    for s in args.set:
        parse_setting(s)
    if args.rotation is not None:
        child(args)
        return
    if not (Path(args.store) / "store.json").is_file():
        raise SystemExit(f"--store {args.store}: no store.json there (bench_decode.py --keep leaves one)")
    rotations = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(len(args.set)):
            out = Path(tmp) / f"rotation{r}.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--rotation", str(r), "--child-out", str(out)]
            subprocess.run(cmd, check=True)
            rotations.append(json.loads(out.read_text()))
            print(f"rotation {r}: " + "; ".join(f"{s}: {summary(v).split(' |')[0]} tok/s"
                                               for s, v in rotations[-1].items()), flush=True)
    totals = {s: {f: sum(r[s][f] for r in rotations) for f in FIELDS} for s in args.set}
    print(f"\n{machine_description()}; {args.store} at {args.memory}, prefetch {args.prefetch}, {args.tokens} tokens "
          f"a rotation, settings switched every {args.block}\n")
    print("| setting | decode tok/s | MB read / token | disk busy | I/O wait ms / token | GB/s while busy |")
    print("|---|---|---|---|---|---|")
    for s, v in totals.items():
        print(f"| {s} | {summary(v)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine_description(), "date": time.strftime(
            "%Y-%m-%d %H:%M UTC", time.gmtime()), "args": {k: v for k, v in vars(args).items()
                                                          if k not in ("rotation", "child_out")},
            "rotations": rotations, "totals": totals}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
