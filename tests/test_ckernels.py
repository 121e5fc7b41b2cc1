"""The hand-written AVX-512 kernels (ckernels.c) compute the products of the torch kernels they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moestream import ckernels, kernels
from moestream.kernels import GroupedWeight
from moestream.quant import dequantize, quantize
from moestream.store import TensorSlot, record_tensors

needs_c = pytest.mark.skipif(not ckernels.available(), reason="no AVX-512 CPU or no C compiler: torch kernels used")


def grouped(rows: int, cols: int, group: int, scale_dtype: torch.dtype, codes: str = "int4") -> GroupedWeight:
    w = torch.randn(rows, cols) * 0.05
    if codes == "int4":
        p = quantize(w, "int4", group)
        return GroupedWeight(p["q"], p["scale"].to(scale_dtype), "int4")
    q = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8)  # e2m1: any byte is two valid codes
    return GroupedWeight(q, (torch.rand(rows, cols // group) + 0.5).to(scale_dtype), "e2m1")


@needs_c
@pytest.mark.parametrize("codes", ["int4", "e2m1"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,group", [(96, 128, 32), (37, 256, 64), (6, 512, 128), (16, 800, 32)])
def test_matvec_equals_the_expanded_product(codes, scale_dtype, rows, cols, group):
    """Row counts off the 4-row blocks, group counts off the 16-scale vectors (800 / 32 = 25), every scale
    dtype and code table: the same float32 products as F.linear on the expanded matrix, summed otherwise."""
    torch.manual_seed(0)
    w = grouped(rows, cols, group, scale_dtype, codes)
    assert ckernels.takes(w)
    x = torch.randn(1, cols)
    want = F.linear(x, kernels.grouped_expand(w.q, w.scale.float(), torch.float32, codes))
    got = ckernels.matvec(x, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.linear(torch.cat([x, 2 * x])), torch.cat([want, 2 * want]), rtol=1e-5, atol=1e-5)


@needs_c
def test_silu_mlp_and_record_mlp_equal_the_torch_kernel():
    """The whole expert from weight objects and straight from a store record's bytes (offsets and scale
    dtypes as a store lays them out) equals kernels.grouped_mlp, the compiled torch kernel it replaces."""
    torch.manual_seed(0)
    hidden, inter = 256, 96
    gate_up, down = grouped(2 * inter, hidden, 32, torch.float16), grouped(hidden, inter, 32, torch.bfloat16)
    x = torch.randn(1, hidden)
    want = kernels.grouped_mlp(x, gate_up.q, gate_up.scale.float(), "int4", None, down.q, down.scale.float(), "int4",
                               None)
    torch.testing.assert_close(ckernels.silu_mlp(x, gate_up, down), want, rtol=1e-5, atol=1e-6)
    parts = {"gate_up_proj.q": gate_up.q, "gate_up_proj.scale": gate_up.scale, "down_proj.q": down.q,
             "down_proj.scale": down.scale}
    slots, offset = [], 0
    for name, t in parts.items():
        slots.append(TensorSlot(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += t.numel() * t.element_size() + 64  # padding between parts, as alignment leaves
    record = torch.zeros(offset, dtype=torch.uint8)
    for s, t in zip(slots, parts.values()):
        record_tensors(record, [s])[s.name].copy_(t)
    layout = ckernels.expert_layout(slots)
    assert layout is not None and layout.hidden == hidden and layout.inter == inter
    y = torch.empty(hidden)
    ckernels.record_mlp(record, layout, x.view(-1), y)
    torch.testing.assert_close(y.view(1, -1), want, rtol=1e-5, atol=1e-6)
    # layouts these kernels do not compute: an extra part (a bias), groups of 16
    bias = TensorSlot("down_proj_bias", "float32", (hidden,), offset)
    assert ckernels.expert_layout([*slots, bias]) is None
    odd = [TensorSlot(s.name, s.dtype, (s.shape[0], s.shape[1] * 2), s.offset) if s.name == "down_proj.scale" else s
           for s in slots]
    assert ckernels.expert_layout(odd) is None


@needs_c
def test_weights_the_kernels_do_not_take_go_to_torch():
    torch.manual_seed(0)
    p = quantize(torch.randn(8, 64), "int4z", 32)
    assert not ckernels.takes(GroupedWeight(p["q"], p["scale"], "uint4", p["zero"].float()))  # zero points
    w = grouped(8, 64, 32, torch.float16)
    assert not ckernels.takes(GroupedWeight(w.q[:, :16], w.scale[:, :1]))  # a column slice: not contiguous
    assert not ckernels.takes(GroupedWeight(torch.zeros(8, 64, dtype=torch.int8), w.scale))  # int8 values
    assert not ckernels.takes(GroupedWeight(w.q, torch.ones(8, 4)))  # groups of 16


def test_a_failed_build_is_reported_once_and_torch_kernels_used(monkeypatch, tmp_path, capsys):
    """No compiler (or one that fails): a note on stderr, once; the products still come from torch's kernels."""
    monkeypatch.setattr(ckernels, "_tried", False)
    monkeypatch.setattr(ckernels, "_lib", None)
    monkeypatch.setenv("MOESTREAM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(ckernels, "_x86", lambda: True)
    assert not ckernels.available() and not ckernels.available()
    assert capsys.readouterr().err.count("C kernels unavailable") == 1
    torch.manual_seed(0)
    w = grouped(16, 64, 32, torch.float16)
    x = torch.randn(1, 64)
    want = F.linear(x, dequantize(w.q, w.scale, torch.float32))
    torch.testing.assert_close(w.linear(x), want, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written left in the cache


@needs_c
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_matvec_sums_the_half_products_in_float32(dtype):
    """200 columns: three 64-wide steps and a tail of 8. Other dtypes and mixed ones are not taken."""
    torch.manual_seed(0)
    w, x = torch.randn(37, 200, dtype=dtype), torch.randn(1, 200, dtype=dtype)
    want = F.linear(x.double(), w.double()).float()
    torch.testing.assert_close(ckernels.dense_matvec(x, w), want, rtol=1e-5, atol=1e-5)
    assert ckernels.dense_matvec(x.float(), w) is None and ckernels.dense_matvec(x.float(), w.float()) is None
    assert ckernels.dense_matvec(x, w.t().contiguous().t()) is None  # not contiguous


@needs_c
@pytest.mark.parametrize("tokens", [2, 8, 11, 40])
def test_several_tokens_equal_the_expanded_product(tokens):
    """Several tokens in one call (8 per pass over each row, 11 and 40 leave a shorter last pass): each token's
    row equals its product with the expanded matrix, and the whole expert equals grouped_mlp token by token."""
    torch.manual_seed(0)
    hidden, inter = 256, 128
    gate_up, down = grouped(2 * inter, hidden, 32, torch.float16), grouped(hidden, inter, 64, torch.bfloat16)
    x = torch.randn(tokens, hidden)
    want = F.linear(x, kernels.grouped_expand(gate_up.q, gate_up.scale.float(), torch.float32, "int4"))
    torch.testing.assert_close(ckernels.matvec(x, gate_up), want, rtol=1e-5, atol=1e-5)
    want = torch.cat([kernels.grouped_mlp(x[i:i + 1], gate_up.q, gate_up.scale.float(), "int4", None, down.q,
                                          down.scale.float(), "int4", None) for i in range(tokens)])
    torch.testing.assert_close(ckernels.silu_mlp(x, gate_up, down), want, rtol=1e-5, atol=1e-6)
