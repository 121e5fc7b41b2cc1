"""What the benchmark scripts share: the synthetic model, the machine's description, the page cache,
and their sections of RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from moestream.convert import convert
from moestream.demo import build_checkpoint


def synthetic_store(scratch: Path) -> Path:
    """The random demo-shaped checkpoint and its store under `scratch`, built once."""
    ckpt, store = scratch / "checkpoint", scratch / "store"
    if not (ckpt / "config.json").is_file():
        scratch.mkdir(parents=True, exist_ok=True)
        build_checkpoint(ckpt)
    if not (store / "store.json").is_file():
        convert(str(ckpt), store, force=True, progress=False)
    return store


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, Linux {platform.release()}"


def drop_caches() -> bool:
    """Empty the kernel's page cache where permitted (root); False where not."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def write_section(path: Path, mark: str, lines: list[str]) -> None:
    """Replace this benchmark's section of RESULTS.md (between two `mark` lines), or append it."""
    block = "\n".join([mark, *lines, mark])
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if mark in text:
        text = re.sub(f"{re.escape(mark)}.*?{re.escape(mark)}", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
