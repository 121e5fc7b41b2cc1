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
needs_int8 = pytest.mark.skipif(not ckernels.int8_available(), reason="no AVX-512 VNNI: no int8-activation kernel")


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
    ckernels.record_mlp([record], layout, x.view(-1), [y])
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
def test_router_guess_ranks_the_normed_input_as_float32_products(dtype):
    """The k experts router (norm * x) ranks first, largest first (200 columns: a tail after 64-wide steps);
    other dtypes and a k past the experts are not taken."""
    torch.manual_seed(0)
    router, norm, x = (torch.randn(*s, dtype=dtype) for s in ((37, 200), (200,), (200,)))
    logits = router.double() @ (norm.float() * x.float()).double()
    assert ckernels.router_guess(router, norm, x, 5) == torch.topk(logits, 5).indices.tolist()
    assert ckernels.router_guess(router, norm, x, 37)[0] == int(logits.argmax())
    assert ckernels.router_guess(router.float(), norm.float(), x.float(), 5) is None
    assert ckernels.router_guess(router, norm, x, 38) is None


@needs_c
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_matvec_sums_the_half_products_in_float32(dtype):
    """200 columns: three 64-wide steps and a tail of 8. Other dtypes and mixed ones are not taken."""
    torch.manual_seed(0)
    w, x = torch.randn(37, 200, dtype=dtype), torch.randn(1, 200, dtype=dtype)
    want = F.linear(x.double(), w.double()).float()
    torch.testing.assert_close(ckernels.dense_matvec(x, w), want, rtol=1e-5, atol=1e-5)
    w = torch.randn(4096, 200, dtype=dtype)  # asked for x's dtype: the float32 sums rounded as .to() rounds them
    assert torch.equal(ckernels.dense_matvec(x, w, dtype), ckernels.dense_matvec(x, w).to(dtype))
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


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,t,dk,dv", [(32, 4, 87, 128, 128), (8, 8, 1, 64, 64), (16, 2, 300, 192, 128),
                                            (4, 1, 33, 40, 24)])
def test_attend_one_matches_sdpa(dtype, hq, hkv, t, dk, dv):
    """One query against a cache (grouped heads, head sizes off 16, a key view with a gap between heads):
    within the error torch's own sdpa has against the float64 result."""
    torch.manual_seed(0)
    q = torch.randn(1, hq, 1, dk, dtype=dtype)
    k = torch.randn(1, hkv, t + 5, dk, dtype=dtype)[:, :, :t]
    v = torch.randn(1, hkv, t, dv, dtype=dtype)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.1, enable_gqa=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=0.1, enable_gqa=True)
    got = ckernels.attend_one(q, k, v, 0.1)
    assert got.shape == (1, 1, hq, dv) and got.dtype == dtype
    ours = (got.double() - want.transpose(1, 2)).abs().max().item()
    theirs = (sdpa.double() - want).abs().max().item()
    assert ours <= 1.5 * theirs + {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_one_batch_under_a_padding_mask_gives_each_row_its_own_bits(dtype):
    """A batch's rows, left-padded to one length and masked, get exactly what each computes alone, and
    sdpa's masked result within its rounding."""
    torch.manual_seed(0)
    lengths, hq, hkv, d = (9, 4, 6), 8, 2, 64
    t = max(lengths)
    q = torch.randn(len(lengths), hq, 1, d, dtype=dtype)
    k, v = torch.randn(len(lengths), hkv, t, d, dtype=dtype), torch.randn(len(lengths), hkv, t, d, dtype=dtype)
    mask = torch.tensor([[i >= t - n for i in range(t)] for n in lengths]).view(-1, 1, 1, t)
    got = ckernels.attend_one(q, k, v, 0.125, mask)
    for row, n in enumerate(lengths):
        alone = ckernels.attend_one(q[row:row + 1], k[row:row + 1, :, t - n:], v[row:row + 1, :, t - n:], 0.125)
        assert torch.equal(got[row:row + 1], alone)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, want, **({} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}))
    assert ckernels.attend_one(q, k, v, 0.125, torch.zeros(3, 1, 1, t)) is None  # additive masks: sdpa


@needs_c
def test_attend_one_leaves_other_shapes_to_sdpa():
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 9, 64)
    assert ckernels.attend_one(q, k, k, 0.1) is not None
    assert ckernels.attend_one(torch.randn(1, 4, 2, 64), k, k, 0.1) is None  # two queries
    assert ckernels.attend_one(q, k.bfloat16(), k, 0.1) is None  # mixed dtypes
    assert ckernels.attend_one(torch.randn(1, 3, 1, 64), k, k, 0.1) is None  # heads not a multiple
    assert ckernels.attend_one(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, 0.1) is None  # strided rows


def q8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded per block of 32 to int8 times max|x| / 127, in float64: what the int8 kernel multiplies."""
    xb = x.double().view(-1, 32)
    d = xb.abs().amax(1, keepdim=True) / 127
    return (torch.round(xb / torch.where(d > 0, d, torch.ones_like(d))) * d).view(-1)


def expert_record(hidden: int, inter: int, group: int = 32):
    """A random int4 expert as a store record, its layout, and its matrices in float64."""
    gate_up, down = grouped(2 * inter, hidden, group, torch.float16), grouped(hidden, inter, group, torch.bfloat16)
    parts = {"gate_up_proj.q": gate_up.q, "gate_up_proj.scale": gate_up.scale, "down_proj.q": down.q,
             "down_proj.scale": down.scale}
    slots, offset = [], 0
    for name, t in parts.items():
        slots.append(TensorSlot(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += t.numel() * t.element_size()
    record = torch.cat([t.contiguous().view(torch.uint8).flatten() for t in parts.values()])
    matrices = [kernels.grouped_expand(w.q, w.scale.float(), torch.float64, "int4") for w in (gate_up, down)]
    return record, ckernels.expert_layout(slots), matrices


@needs_int8
@pytest.mark.parametrize("hidden,inter", [(2048, 768), (256, 96), (96, 160)])
def test_record_mlp_int8_is_the_product_of_the_rounded_activations(hidden, inter):
    """int8 activations (odd block counts included): exactly the float64 product of the int8-rounded input and
    intermediate activations with the int4 matrices, up to float32 sums; ~1 % from the exact expert."""
    torch.manual_seed(0)
    record, layout, (wg, wd) = expert_record(hidden, inter)
    assert ckernels.int8_ok(layout)
    x = torch.randn(hidden)

    def expert(rounding):
        g, u = (wg @ rounding(x.double())).split(inter)
        return wd @ rounding(g / (1 + torch.exp(-g)) * u)

    want, exact = expert(q8_rounded), expert(lambda t: t)
    got = torch.empty(hidden)
    ckernels.record_mlp([record], layout, x, [got], int8=True)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5
    err = ((got.double() - exact).norm() / exact.norm()).item()
    assert 1e-4 < err < 0.05
    ckernels.record_mlp([record], layout, x, [got])
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5


@needs_c
@pytest.mark.parametrize("int8", [False, True])
def test_record_mlp_shares_several_experts_out_with_the_same_results(int8):
    """Several experts in one call (each whole on one thread, outputs in rows given in any order) equal each
    computed alone with its rows shared among the threads."""
    if int8 and not ckernels.int8_available():
        pytest.skip("no AVX-512 VNNI: no int8-activation kernel")
    torch.manual_seed(0)
    experts = [expert_record(256, 96) for _ in range(5)]
    layout = experts[0][1]
    x = torch.randn(256)
    together = torch.empty(5, 256)
    ckernels.record_mlp([r for r, _, _ in experts], layout, x, [together[j] for j in (3, 0, 4, 1, 2)], int8)
    for i, j in enumerate((3, 0, 4, 1, 2)):
        alone = torch.empty(256)
        ckernels.record_mlp([experts[i][0]], layout, x, [alone], int8)
        assert torch.equal(together[j], alone)


@needs_c
def test_int8_activations_need_groups_of_32():
    _, layout, _ = expert_record(256, 128, group=64)
    assert layout is not None and not ckernels.int8_ok(layout)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weighted_sum_rounds_as_the_eager_loop(dtype):
    """One token's expert outputs weighted and added in a given order, rounded after each step as
    transformers' eager loop rounds them: the same bits (2000 values: a ragged last vector)."""
    torch.manual_seed(0)
    ys, weights, slots = torch.randn(8, 2000), torch.rand(8).to(dtype), [3, 1, 0, 7, 2, 6, 5, 4]
    got = torch.randn(2000).to(dtype)
    want = got.clone()
    assert ckernels.weighted_sum(ys, slots, weights, got)
    scaled = ys.to(dtype) * weights[slots, None]
    for j in range(len(slots)):
        want += scaled[j]
    assert torch.equal(got, want)
    assert not ckernels.weighted_sum(ys, slots, weights.float() if dtype != torch.float32 else weights.half(), got)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_c_rms_norm_replaces_only_the_standard_forward(dtype):
    """Qwen3's and Mixtral's RMSNorm (transformers' standard forward) get the C kernel, with the same bits here
    (the float32 sum of squares is ordered otherwise: close, not always equal); Gemma's (1 + weight) keeps
    its own."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    torch.manual_seed(0)
    for cls in (Qwen3MoeRMSNorm, MixtralRMSNorm):
        norm = cls(200).to(dtype)
        norm.weight.data = torch.randn(200).to(dtype)
        x = (torch.randn(3, 5, 200) * 3).to(dtype)
        want = norm(x)
        assert kernels.use_c_norms(norm) == 1 and "forward" in vars(norm)
        torch.testing.assert_close(norm(x), want, rtol=1e-6 if dtype == torch.float32 else 0, atol=1e-6)
    gemma = GemmaRMSNorm(200)
    assert kernels.use_c_norms(gemma) == 0 and "forward" not in vars(gemma)
