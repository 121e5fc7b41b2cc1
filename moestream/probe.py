"""Measure the local SSD the way the runtime reads it: aligned O_DIRECT reads of one record size,
in rounds of 1..Q parallel reads. A straight-line fit of round time against reads per round gives
the cost model's r (intercept) and B (record size over slope)."""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .reader import AlignedBuffer
from .store import ALIGN, align_up


@dataclass
class ProbeResult:
    path: str
    record_bytes: int
    queue_depth: int
    direct: bool
    rounds: dict[int, float]  # reads per round -> median seconds per round
    latency: float  # r
    bandwidth: float  # B, bytes/s
    peak_bandwidth: float  # bytes/s at full depth, measured directly

    def describe(self) -> str:
        return (f"probe {self.path}: {self.record_bytes / 1e6:.2f} MB reads, depth {self.queue_depth}, "
                f"{'O_DIRECT' if self.direct else 'buffered'}: {self.peak_bandwidth / 1e9:.2f} GB/s at full depth, "
                f"fit r = {self.latency * 1e3:.2f} ms per round, B = {self.bandwidth / 1e9:.2f} GB/s")


def _open(path: Path) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except (OSError, AttributeError):
        return os.open(path, os.O_RDONLY), False


def probe(directory: str | os.PathLike, record_bytes: int, queue_depth: int = 8, seconds: float = 3.0,
          file_bytes: int = 1 << 30) -> ProbeResult:
    """Read random records of `record_bytes` from a scratch file made in `directory` (removed after)."""
    from concurrent.futures import ThreadPoolExecutor

    if queue_depth < 1:
        raise ValueError(f"--queue-depth must be at least 1, got {queue_depth}")
    record_bytes = align_up(record_bytes, ALIGN)
    n_records = max(4 * queue_depth, file_bytes // record_bytes)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--probe {directory}: no such directory")
    fd_w, path = tempfile.mkstemp(prefix=".moestream-probe-", dir=directory)
    path = Path(path)
    try:
        block = os.urandom(1 << 20) * max(1, record_bytes >> 20) + os.urandom(record_bytes % (1 << 20))
        with os.fdopen(fd_w, "wb") as f:
            for _ in range(n_records):
                f.write(block[:record_bytes])
            f.flush()
            os.fsync(f.fileno())
        fd, direct = _open(path)
        try:
            if hasattr(os, "posix_fadvise"):  # not on macOS
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            bufs = [AlignedBuffer(record_bytes) for _ in range(queue_depth)]
            rng = random.Random(0)
            rounds: dict[int, float] = {}
            sizes = sorted({n for n in (1, 2, queue_depth // 2, queue_depth) if 1 <= n <= queue_depth})
            with ThreadPoolExecutor(queue_depth) as pool:
                budget = seconds / len(sizes)
                for n in sizes:
                    times, t_end = [], time.perf_counter() + budget
                    while time.perf_counter() < t_end or len(times) < 3:
                        offs = [rng.randrange(n_records) * record_bytes for _ in range(n)]
                        t0 = time.perf_counter()
                        list(pool.map(lambda a: os.preadv(fd, [bufs[a[0]].mm], a[1]), enumerate(offs)))
                        times.append(time.perf_counter() - t0)
                    times.sort()
                    rounds[n] = times[len(times) // 2]
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    xs, ys = list(rounds), list(rounds.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else ys[0]
    slope = max(slope, 1e-9)
    latency = max(0.0, my - slope * mx)
    return ProbeResult(str(directory), record_bytes, queue_depth, direct, rounds, latency, record_bytes / slope,
                       queue_depth * record_bytes / rounds[queue_depth])
