"""Reading expert records: one aligned `pread` per expert, several in flight.

Records are read with O_DIRECT where the filesystem allows it, so the kernel's page
cache does not keep a second copy of what our cache already holds; where it does not
(tmpfs, some network filesystems) we fall back to buffered reads and say so once.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash

from .store import ALIGN, LayerInfo, Store

CHECKSUM = "xxh3_64"
# guessed reads in flight at once (bench_decode's model with spread routing, in-process, prefetch auto: 1 / 2 / 4 / 8
# threads 6 GiB 5.93 / 6.90-7.14 / 7.15-7.16 / 6.39-6.44 tok/s, 4 GiB 4.70 / 5.00 / 5.19, 2 GiB 3.20 / 3.51 / 3.58)
GUESS_THREADS = 4


def checksum(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


HUGE_PAGE = 2 << 20


def huge_region(nbytes: int) -> torch.Tensor:
    """nbytes of fresh anonymous memory from a 2 MiB boundary, its whole 2 MiB pages advised to transparent huge
    pages (madvise, where the kernel allows it; nothing is touched here), as a uint8 tensor that keeps the mapping.

    Why: weights streamed from memory ran 30-31 GB/s on huge pages against 21-22 GB/s on 4 KB pages on this
    project's Xeon VM (each 4 KB page a page walk through the guest's and the host's tables; benchmarks/RESULTS.md).
    Only whole huge pages inside nbytes are advised: nothing past nbytes becomes resident."""
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    base = torch.frombuffer(mm, dtype=torch.uint8)
    start = -base.data_ptr() % HUGE_PAGE
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    if whole and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, start, whole)
        except OSError:  # THP compiled out: 4 KB pages, the same results
            pass
    return base[start:start + nbytes]


class AlignedBuffer:
    """Aligned host memory as O_DIRECT requires, seen as a uint8 tensor: its own anonymous mapping, or `region`,
    an ALIGN-aligned slice of a larger one (huge_region: ExpertCache.reserve).

    A private mapping, not mmap's default shared one: shared anonymous pages are shmem, which this project's
    VMs faulted in about 6x slower (1 GB in 2.7 s against 0.45 s, benchmarks/RESULTS.md). `populate`: fault
    every page in now."""

    def __init__(self, nbytes: int, populate: bool = False, region: torch.Tensor | None = None):
        self.nbytes = nbytes
        self.region = region is not None
        if region is not None:
            # records are ALIGN multiples: slices of one aligned region stay aligned
            if region.numel() != nbytes or region.data_ptr() % ALIGN:
                raise ValueError(f"a record buffer needs {nbytes} bytes aligned to {ALIGN} for O_DIRECT")
            self.tensor = region
            self.mm = memoryview(region.numpy())
            return
        self.mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0))
        self.tensor = torch.frombuffer(self.mm, dtype=torch.uint8)


class RecordCorrupt(Exception):
    """A record whose bytes do not match the checksum written at conversion."""


class RecordReader:
    """Reads expert records into AlignedBuffers on a pool of threads (preadv releases the GIL)."""

    def __init__(self, store: Store, threads: int = 8, direct: bool = True, verify: bool = False):
        self.store = store
        self.verify = verify
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="moestream-read")
        # guesses (prefetch) read on GUESS_THREADS threads of their own: requested reads never queue behind them, and
        # a guess not yet started is dropped when its layer asks for other experts (or read at once if it asks for it)
        self.guess_pool = ThreadPoolExecutor(max_workers=GUESS_THREADS, thread_name_prefix="moestream-guess")
        self.direct = direct
        self._busy_lock = threading.Lock()
        self._in_flight = 0  # reads inside preadv now
        self._busy = 0.0  # seconds with at least one read in flight, up to _since
        self._since = 0.0
        self.fallback_reason: str | None = None if direct else "O_DIRECT disabled by the caller"
        self._fds: dict[int, int] = {}
        for info in store.layers:
            self._fds[info.layer] = self._open(store.root / info.path, info.record_bytes)

    def _open(self, path: Path, record_bytes: int) -> int:
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                self._fall_back(f"{path.parent} does not allow O_DIRECT ({e.strerror})")
            else:
                # Some filesystems accept the flag at open and refuse the read: probe once.
                probe = AlignedBuffer(4096)
                try:
                    os.preadv(fd, [probe.mm], 0)
                    return fd
                except OSError as e:
                    os.close(fd)
                    self._fall_back(f"{path.parent} refuses O_DIRECT reads ({e.strerror})")
        elif self.direct:
            self._fall_back("this platform has no O_DIRECT")
        return os.open(path, os.O_RDONLY)

    def _fall_back(self, reason: str) -> None:
        self.direct = False
        self.fallback_reason = reason

    def read(self, info: LayerInfo, expert: int, buf: AlignedBuffer) -> float:
        """Read one record into `buf`; returns the seconds the read took. Blocking."""
        path = self.store.root / info.path
        if not 0 <= expert < info.experts:
            raise IndexError(f"{path}: expert {expert} out of range (layer {info.layer} has {info.experts})")
        t0 = time.perf_counter()
        offset = expert * info.record_bytes
        view = memoryview(buf.mm)[: info.record_bytes]
        self._busy_change(+1)
        try:
            got = os.preadv(self._fds[info.layer], [view], offset)
        finally:
            self._busy_change(-1)
        if got != info.record_bytes:
            raise RecordCorrupt(
                f"{path}: short read for layer {info.layer}, expert {expert}: "
                f"{got} of {info.record_bytes} bytes at offset {offset}; the store is truncated"
            )
        if self.verify:
            have = checksum(view)
            want = info.checksums[expert]
            if have != want:
                raise RecordCorrupt(
                    f"{path}: checksum mismatch for layer {info.layer}, expert {expert} (record at offset {offset}, "
                    f"{info.record_bytes} bytes): expected {CHECKSUM} {want}, got {have}. "
                    "The store is damaged; run `moestream convert` again."
                )
        return time.perf_counter() - t0

    def _busy_change(self, step: int) -> None:
        with self._busy_lock:
            now = time.perf_counter()
            if self._in_flight:
                self._busy += now - self._since
            self._since = now
            self._in_flight += step

    def busy_seconds(self) -> float:
        """Seconds so far with at least one read in flight: the time the SSD was kept busy. Beside the elapsed
        time it says how much of a run the reads left the disk idle, whatever the disk's speed that day."""
        with self._busy_lock:
            return self._busy + (time.perf_counter() - self._since if self._in_flight else 0.0)

    def buffer(self, nbytes: int, populate: bool = False) -> AlignedBuffer:
        return AlignedBuffer(nbytes, populate)

    def submit(self, info: LayerInfo, expert: int, buf: AlignedBuffer, guess: bool = False) -> Future:
        return (self.guess_pool if guess else self.pool).submit(self.read, info, expert, buf)

    def close(self) -> None:
        self.guess_pool.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
