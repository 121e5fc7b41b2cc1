"""DESIGN.md's cost model, in one place for the simulator, the planner and the benchmarks.

    T_io  = sum over MoE layers of [ ceil(m / Q) * r + m * S / B ]     (m misses in that layer)
    tok/s = 1 / (T_compute + (1 - o) * T_io)

Q reads in flight, r the fixed cost of one round of parallel reads, B the SSD's bandwidth at
the record size S and depth Q, o the share of I/O hidden behind compute. The runtime computes a
layer's cached experts while its misses are read, which hides at most that compute; predictions
use o = 0, the conservative end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Machine:
    bandwidth: float  # bytes/s for record-sized reads at `queue_depth`
    latency: float = 0.0  # seconds, fixed cost of one round of parallel reads (r)
    queue_depth: int = 8  # Q
    compute: float = 0.0  # seconds of compute per decoded token, experts resident
    overlap: float = 0.0  # o
    source: str = ""  # where these figures came from, for the report

    def io_seconds(self, misses: list[float], record_bytes: list[int]) -> float:
        """I/O time of one token, given its misses in each layer (fractions allowed: expected values)."""
        t = 0.0
        for m, s in zip(misses, record_bytes):
            if m > 0:
                t += math.ceil(m / self.queue_depth) * self.latency + m * s / self.bandwidth
        return t

    def expected_io_seconds(self, k: int, miss_rate: float, record_bytes: int, layers: int) -> float:
        """Expected I/O time of one token when each of a layer's k experts misses independently with
        `miss_rate`: rounds are averaged over the binomial number of misses, not taken at the mean."""
        rounds = sum(math.comb(k, m) * miss_rate**m * (1 - miss_rate) ** (k - m) * math.ceil(m / self.queue_depth)
                     for m in range(k + 1))
        return layers * (rounds * self.latency + k * miss_rate * record_bytes / self.bandwidth)

    def token_seconds(self, misses: list[float], record_bytes: list[int]) -> float:
        return self.compute + (1 - self.overlap) * self.io_seconds(misses, record_bytes)


def tokens_per_second(step_seconds: list[float]) -> float:
    """Tokens over total time (not the mean of per-token rates)."""
    total = sum(step_seconds)
    return len(step_seconds) / total if total > 0 else float("inf")
