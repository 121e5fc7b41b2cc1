"""Routing traces: which experts every MoE layer chose, token by token, and how the run went.

A trace is what the simulator replays and the planner learns hit rates from. One `.npz` file:
  layers, num_experts, record_bytes    per MoE layer
  step_tokens, step_sequence, step_decode   per forward pass (a prefill chunk or one decode token)
  experts (tokens, layers, k) int32 and weights (tokens, layers, k) float16, -1/0 padded
  meta: JSON (model, store, dense bytes, the run's memory plan and timings)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class TraceError(Exception):
    """A trace file that is missing or malformed."""


class TraceRecorder:
    """Collects routing during generation; a new step starts when the first MoE layer runs again."""

    def __init__(self, layers: list[int], num_experts: list[int], record_bytes: list[int]):
        self.layers = layers
        self.num_experts = num_experts
        self.record_bytes = record_bytes
        self._col = {layer: i for i, layer in enumerate(layers)}
        self.steps: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
        self.step_sequence: list[int] = []
        self.step_decode: list[bool] = []
        self.sequence = -1
        self.decoding = False
        self.runs: list[dict] = []  # per sequence: the run's stats

    def new_sequence(self) -> None:
        self.sequence += 1
        self.decoding = False

    def record(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        if layer == self.layers[0] or not self.steps:
            self.steps.append({})
            self.step_sequence.append(max(self.sequence, 0))
            self.step_decode.append(self.decoding)
        self.steps[-1][layer] = (top_k_index.detach().cpu().numpy().astype(np.int32),
                                 top_k_weights.detach().float().cpu().numpy())

    def save(self, path: str | os.PathLike, meta: dict) -> Path:
        if not self.steps:
            raise TraceError("nothing was recorded: no MoE layer ran")
        k = max(idx.shape[1] for step in self.steps for idx, _ in step.values())
        tokens = [next(iter(step.values()))[0].shape[0] for step in self.steps]
        experts = np.full((sum(tokens), len(self.layers), k), -1, dtype=np.int32)
        weights = np.zeros((sum(tokens), len(self.layers), k), dtype=np.float16)
        row = 0
        for step, n in zip(self.steps, tokens):
            for layer, (idx, w) in step.items():
                c = self._col[layer]
                experts[row : row + n, c, : idx.shape[1]] = idx
                weights[row : row + n, c, : w.shape[1]] = w
            row += n
        path = Path(path)
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez_compressed(
            tmp, layers=np.array(self.layers, dtype=np.int32), num_experts=np.array(self.num_experts, dtype=np.int32),
            record_bytes=np.array(self.record_bytes, dtype=np.int64), step_tokens=np.array(tokens, dtype=np.int32),
            step_sequence=np.array(self.step_sequence, dtype=np.int32),
            step_decode=np.array(self.step_decode, dtype=bool), experts=experts, weights=weights,
            meta=np.array(json.dumps({**meta, "runs": self.runs})),
        )
        os.replace(tmp, path)
        return path


@dataclass
class Trace:
    layers: np.ndarray
    num_experts: np.ndarray
    record_bytes: np.ndarray
    step_tokens: np.ndarray
    step_sequence: np.ndarray
    step_decode: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    meta: dict

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        try:
            with np.load(path, allow_pickle=False) as z:
                fields = {k: z[k] for k in cls.__dataclass_fields__ if k != "meta"}
                meta = json.loads(str(z["meta"]))
        except FileNotFoundError:
            raise TraceError(f"{path}: no such trace file") from None
        except (KeyError, ValueError, OSError, EOFError) as e:  # EOFError: an empty file
            raise TraceError(f"{path}: not a moestream trace ({e})") from e
        t = cls(meta=meta, **fields)
        if t.experts.shape[0] != int(t.step_tokens.sum()) or t.experts.shape[1] != len(t.layers):
            raise TraceError(f"{path}: experts array {t.experts.shape} does not match its steps and layers")
        return t

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def decode_tokens(self) -> int:
        return int(self.step_tokens[self.step_decode].sum())

    def decode_timing(self) -> dict | None:
        """From the traced runs: compute seconds per decoded token (time not spent waiting on reads) and
        a conservative read bandwidth (bytes over the summed duration of single reads, as if one at a
        time); None if nothing was decoded."""
        runs = [r for r in self.meta.get("runs", []) if r.get("generated_tokens", 0) > 1]
        if not runs:
            return None
        tokens = sum(r["generated_tokens"] - 1 for r in runs)
        seconds = sum(r["decode_seconds"] for r in runs)
        wait = sum(r["decode"]["wait_seconds"] for r in runs)
        read = sum(r["decode"]["bytes_read"] for r in runs)
        busy = sum(r["decode"]["read_seconds"] for r in runs)
        return {"compute": max(0.0, seconds - wait) / tokens, "bandwidth": read / busy if busy > 0 and read else None}

    def steps(self):
        """(decode?, experts of this step (tokens, layers, k)) for every forward pass, in order."""
        row = 0
        for n, dec in zip(self.step_tokens.tolist(), self.step_decode.tolist()):
            yield dec, self.experts[row : row + n]
            row += n
