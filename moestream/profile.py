"""Expert-use profiles: how often each (layer, expert) was chosen on some prompts, and the hottest
set that fits a budget, to pin in the cache (`--pin`). Made from a routing trace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .policy import Key
from .trace import Trace


class ProfileError(Exception):
    """A profile file that is missing, malformed or of another model."""


def profile_from_trace(trace: Trace) -> dict:
    counts = {}
    for c, layer in enumerate(trace.layers.tolist()):
        col = trace.experts[:, c].ravel()
        counts[str(layer)] = np.bincount(col[col >= 0], minlength=int(trace.num_experts[c])).tolist()
    return {"format": "moestream-profile", "version": 1, "model_type": trace.meta.get("model_type"),
            "source": trace.meta.get("source"), "tokens": int(trace.step_tokens.sum()), "counts": counts,
            "record_bytes": {str(l): int(b) for l, b in zip(trace.layers.tolist(), trace.record_bytes.tolist())}}


def save_profile(profile: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(profile))
    os.replace(tmp, path)
    return path


def load_profile(path: str | os.PathLike) -> dict:
    try:
        p = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not JSON ({e})") from e
    if p.get("format") != "moestream-profile":
        raise ProfileError(f"{path}: not a moestream profile (make one with `moestream profile`)")
    return p


def hottest(profile: dict, budget: int, record_bytes: dict[int, int]) -> list[Key]:
    """The most used experts, hottest first, whose records fit in `budget` bytes; checks the layers match."""
    known = {int(layer) for layer in profile["counts"]}
    if known != set(record_bytes):
        raise ProfileError(f"the profile covers MoE layers {sorted(known)}, this model has {sorted(record_bytes)}")
    ranked = sorted(((n, int(layer), e) for layer, counts in profile["counts"].items() for e, n in enumerate(counts)
                     if n > 0), key=lambda x: (-x[0], x[1], x[2]))
    keys, used = [], 0
    for _, layer, e in ranked:
        if used + record_bytes[layer] > budget:
            break
        keys.append((layer, e))
        used += record_bytes[layer]
    return keys
