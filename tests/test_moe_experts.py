"""Routed experts: grouped_mm == sort+loop == reference loop (outputs and gradients); router; balancing."""

from __future__ import annotations

import pytest
import torch

from mmkit.models.kimivl import moe
from mmkit.models.kimivl.moe import MoE, GroupedExperts, TopKRouter, expert_layout, grouped_mm_supported

E, D, I, N, K = 6, 16, 8, 40, 2


def _experts_and_routing():
    ex = GroupedExperts(E, D, I)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.3)
    torch.nn.init.normal_(ex.down_proj, std=0.3)
    x = torch.randn(N, D, requires_grad=True)
    idx = torch.randint(0, E - 1, (N, K))  # expert E-1 gets no token: empty group
    idx[:, 1] = (idx[:, 0] + 1 + torch.randint(0, E - 2, (N,))) % (E - 1)  # distinct experts per token
    w = torch.rand(N, K, requires_grad=True)
    return ex, x, idx, w


def _run(ex, x, idx, w, impl, backward="weighted"):
    for t in (x, w, ex.gate_up_proj, ex.down_proj):
        t.grad = None
    ex.impl = impl
    out = ex(x, idx, w)
    if backward == "sum":
        out.sum().backward()  # stride-0 expanded gradient: grouped_mm's CPU backward needs it contiguous
    else:
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach()] + [t.grad.clone() for t in (x, w, ex.gate_up_proj, ex.down_proj)]


@pytest.mark.parametrize("block", [1, 4, 64])
@pytest.mark.parametrize("backward", ["weighted", "sum"])
def test_grouped_and_loop_equal_reference_outputs_and_grads(backward, block, monkeypatch):
    monkeypatch.setattr(moe, "CPU_GROUP_BLOCK", block)  # groups padded to multiples of block rows
    ex, x, idx, w = _experts_and_routing()
    ref = _run(ex, x, idx, w, "reference", backward)
    impls = ["loop"] + (["grouped_mm"] if grouped_mm_supported(x.device, x.dtype, D, I) else [])
    for impl in impls:
        got = _run(ex, x, idx, w, impl, backward)
        for name, a, b in zip(["out", "dx", "dw", "dgate_up", "ddown"], got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{impl} {name}")
    assert ref[3][E - 1].abs().sum() == 0  # the unused expert gets a zero gradient


@pytest.mark.parametrize("block", [1, 3, 8])
def test_expert_layout_pads_groups_and_inverts(block):
    n, k, e = 23, 2, 5
    flat = torch.randint(0, e - 1, (n * k,))  # the last expert gets nothing
    src, inv, order, counts = expert_layout(flat, e, k, block)
    assert counts.sum() == src.numel() == order.numel() and (counts % block == 0).all()
    assert counts[e - 1] == 0
    real = order < n * k
    assert int(real.sum()) == n * k  # every pair has exactly one row
    assert torch.equal(order[inv], torch.arange(n * k))  # inv is order's inverse on the pairs
    assert torch.equal(src[inv], torch.arange(n * k) // k)  # each pair's row reads its token
    assert (src[~real] == n).all()  # padding rows read the zero row
    ends = counts.cumsum(0)
    row_expert = torch.searchsorted(ends, torch.arange(src.numel()), right=True)  # (P,) group of each row
    assert torch.equal(row_expert[inv], flat)  # each pair sits in its expert's group
    groups = [order[a:b] for a, b in zip((ends - counts).tolist(), ends.tolist())]
    for g in groups:  # within a group: pairs first, in their original order, then padding
        pairs = g[g < n * k]
        assert torch.equal(g[:pairs.numel()], pairs) and torch.equal(pairs, pairs.sort().values)


@pytest.mark.skipif(not grouped_mm_supported(torch.device("cpu"), torch.bfloat16, D, I), reason="no grouped_mm")
def test_cpu_expert_groups_are_multiples_of_the_block(monkeypatch):
    """oneDNN compiles a GEMM per row count: CPU groups come in multiples of CPU_GROUP_BLOCK rows."""
    seen = []
    real = moe._grouped_mm

    def spy(x, w, offs):
        seen.append(torch.diff(offs, prepend=offs.new_zeros(1)))
        return real(x, w, offs)

    monkeypatch.setattr(moe, "_grouped_mm", spy)
    ex, x, idx, w = _experts_and_routing()
    ex.impl = "grouped_mm"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ex(x, idx, w).float().sum().backward()
    assert seen and all((s % moe.CPU_GROUP_BLOCK == 0).all() for s in seen)


@pytest.mark.skipif(not grouped_mm_supported(torch.device("cpu"), torch.bfloat16, D, I), reason="no grouped_mm")
def test_grouped_under_bf16_autocast_close_to_reference():
    ex, x, idx, w = _experts_and_routing()
    ref = ex.forward_reference(x, idx, w).detach()
    ex.impl = "grouped_mm"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ex(x, idx, w)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert ex.gate_up_proj.grad.dtype == torch.float32  # master weights stay fp32
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


def test_auto_falls_back_to_loop_for_misaligned_widths():
    ex = GroupedExperts(3, 16, 12)  # 12 bf16 = 24 bytes: not a 16-byte stride
    torch.nn.init.normal_(ex.gate_up_proj, std=0.2)
    torch.nn.init.normal_(ex.down_proj, std=0.2)
    x, idx, w = torch.randn(5, 16), torch.randint(0, 3, (5, 1)), torch.rand(5, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ex(x, idx, w)  # must not raise "strides should be multiple of 16 bytes"
    torch.testing.assert_close(out.float(), ex.forward_reference(x, idx, w), atol=0.02, rtol=0.05)


def test_router_matches_transformers_topk_router():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=D, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                           routed_scaling_factor=2.446, norm_topk_prob=True)
    ref = DeepseekV3TopkRouter(cfg)
    ours = TopKRouter(D, 8, 3, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.446)
    with torch.no_grad():
        ref.weight.normal_()
        ref.e_score_correction_bias.normal_(0, 0.5)
        ours.weight.copy_(ref.weight)
        ours.e_score_correction_bias.copy_(ref.e_score_correction_bias)
    x = torch.randn(N, D)
    _, w_ref, i_ref = ref(x)
    _, i, w = ours(x)
    # top-k order is unspecified: compare as sorted (expert, weight) pairs per token
    o_ref, o = i_ref.sort(-1), i.sort(-1)
    assert torch.equal(o.values, o_ref.values)
    torch.testing.assert_close(w.gather(1, o.indices), w_ref.gather(1, o_ref.indices))
    ours.to(torch.bfloat16)
    assert ours.e_score_correction_bias.dtype == torch.float32  # bias stays fp32 under .to(bf16)


def test_balancing_bias_drives_skewed_router_to_balance():
    torch.manual_seed(0)
    moe = MoE(D, I, n_routed_experts=8, n_shared_experts=0, num_experts_per_tok=2)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.1)
        moe.gate.weight[0] += 0.3  # expert 0 attracts (almost) every token
    data = torch.randn(32, 16, D) + 0.5

    def load_max():
        moe.tokens_per_expert.zero_()
        with torch.no_grad():
            moe(data)
        c = moe.tokens_per_expert.clone()
        return (c.max() / c.mean()).item()

    moe.train()
    before = load_max()
    for _ in range(150):
        with torch.no_grad():
            moe(data[torch.randint(0, 32, (4,))])
        moe.update_bias(gamma=0.005)
    after = load_max()
    assert before > 3.0  # top-2 of 8 with one slot always on expert 0: max/mean near 4
    assert after < 1.35, (before, after)
    bias = moe.gate.e_score_correction_bias
    assert bias[0] < bias[1:].min()  # the overloaded expert was pushed down
    assert abs(bias.mean().item()) < 1e-5  # zero-mean updates
    # no update with gamma 0, and the counts are cleared either way
    frozen = bias.clone()
    moe(data[:2])
    moe.update_bias(gamma=0.0)
    assert torch.equal(moe.gate.e_score_correction_bias, frozen) and moe.tokens_per_expert.sum() == 0
