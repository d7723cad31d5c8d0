"""mmkit.nn fast CPU paths (blocked attention, tanh GELU) against the PyTorch reference ops."""

import pytest
import torch
import torch.nn.functional as F

from mmkit.nn.activation import _GeluTanh, gelu_tanh
from mmkit.nn.attention import attention, blocked_attention


def _qkv(B, H, T, S, D, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # (B, T, H, D) storage transposed to (B, H, T, D): the layout the models pass in
    q = torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, S, H, Dv, generator=g).to(dtype).transpose(1, 2)
    return q, k, v, torch.randn(B, H, T, Dv, generator=g).to(dtype)


def _fwd_bwd(fn, q, k, v, gout):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(gout)
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def _doc_mask(T):
    doc = torch.tensor([[0] * (T // 3) + [1] * (T - T // 3), [0] * (T - 5) + [-1] * 5])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (2, 1, T, T)


@pytest.mark.parametrize("keep_probs", [True, False])
@pytest.mark.parametrize("case", ["causal", "full", "cross", "docmask", "dv"])
def test_blocked_attention_matches_sdpa_fp32(case, keep_probs, monkeypatch):
    import mmkit.nn.attention as A

    monkeypatch.setattr(A, "_Q_BLOCK", 32)  # several query blocks and head groups at a tiny size
    monkeypatch.setattr(A, "_SCORE_BYTES", 32 * 100 * 4 * 2)
    if not keep_probs:  # backward recomputes the probabilities (long-sequence path)
        monkeypatch.setattr(A, "_SAVE_P_BYTES", 0)
    T, S, D, Dv, mask, causal = 100, 100, 16, 16, None, False
    if case == "causal":
        causal = True
    elif case == "cross":
        S = 70
    elif case == "docmask":
        mask = _doc_mask(T)
    elif case == "dv":
        D, Dv, causal = 24, 8, True
    q, k, v, gout = _qkv(2, 4, T, S, D, Dv)
    ref = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask, is_causal=causal),
                   q, k, v, gout)
    ours = _fwd_bwd(lambda a, b, c: blocked_attention(a, b, c, mask, causal), q, k, v, gout)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["causal", "docmask", "shared_mask", "pad_keys"])
def test_blocked_attention_whole_rows_per_step_match_sdpa_fp32(case, monkeypatch):
    """Short rows: several rows (all heads) share one bmm, dk / dv are written in place; 3 rows in
    steps of 2 (an uneven last step), per-row and shared masks, key ranges that skip padding."""
    import mmkit.nn.attention as A

    B, H, T = 3, 4, 100
    monkeypatch.setattr(A, "_ROW_SCORE_BYTES", 2 * H * T * T * 4)
    assert A._plan(B, H, T, T) == (T, H, 2)
    q, k, v, gout = _qkv(B, H, T, T, 16, 16, seed=1)
    causal, mask = case == "causal", None
    if case in ("docmask", "pad_keys"):
        mask = torch.cat([_doc_mask(T), _doc_mask(T)[:1]])  # (3, 1, T, T)
        if case == "pad_keys":  # no query sees keys 90.. in any row: each step's key range ends at 90
            mask[..., 90:] = False
            mask[:, :, 90:, 0] = True
    elif case == "shared_mask":
        mask = _doc_mask(T)[:1]  # (1, 1, T, T): broadcast over the rows
    ref = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask, is_causal=causal),
                   q, k, v, gout)
    ours = _fwd_bwd(lambda a, b, c: blocked_attention(a, b, c, mask, causal), q, k, v, gout)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    if case == "pad_keys":
        assert ours[2][..., 90:, :].abs().sum() == 0 and ours[3][..., 90:, :].abs().sum() == 0


def test_blocked_attention_layout_memo_follows_the_mask(monkeypatch):
    """The per-mask layout (key ranges, bias) is reused across calls with the same mask, and
    never for another mask or for the same mask changed in place."""
    import mmkit.nn.attention as A

    monkeypatch.setattr(A, "_Q_BLOCK", 32)
    q, k, v, gout = _qkv(2, 4, 100, 100, 16, 16)
    mask = _doc_mask(100)

    def both(m):
        ref = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=m.clone()), q, k, v, gout)
        ours = _fwd_bwd(lambda a, b, c: blocked_attention(a, b, c, m), q, k, v, gout)
        for x, y in zip(ours, ref):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)

    calls = []
    steps = A._steps
    monkeypatch.setattr(A, "_steps", lambda *a: calls.append(1) or steps(*a))
    both(mask)
    both(mask)  # same tensor, unchanged: forward and backward reuse one layout
    assert len(calls) == 1
    mask[0, 0, 60:, :40] = True  # in place: document 0 now sees more keys
    both(mask)
    both(_doc_mask(100))  # an equal but different tensor
    assert len(calls) == 3


@pytest.mark.parametrize("causal", [True, False])
def test_attention_bf16_cpu_error_like_sdpa(causal):
    q, k, v, gout = _qkv(2, 3, 130, 130, 32, 32)
    ref = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), q, k, v, gout)
    lo = [x.bfloat16() for x in (q, k, v, gout)]
    sdpa = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal), *lo)
    ours = _fwd_bwd(lambda a, b, c: attention(a, b, c, is_causal=causal), *lo)
    for o, s, r in zip(ours, sdpa, ref):
        scale = r.abs().max()
        # bf16 rounding of scores / probabilities: same order as SDPA's own bf16 error
        assert (o - r).abs().max() / scale < max(3 * (s - r).abs().max() / scale, 1e-2)


def test_attention_fp32_is_sdpa_exactly():
    q, k, v, _ = _qkv(1, 2, 80, 80, 16, 16)
    for causal in (True, False):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.equal(attention(q, k, v, is_causal=causal), ref)


def test_gelu_tanh_matches_aten():
    x = torch.randn(300, 70, generator=torch.Generator().manual_seed(0)) * 3
    g = torch.randn(300, 70, generator=torch.Generator().manual_seed(1))
    # fp32 through the sigmoid form: equal to aten's tanh form up to fp32 rounding
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.gelu(a, approximate="tanh").backward(g)
    y = _GeluTanh.apply(b)
    y.backward(g)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(b.grad, a.grad)
    # bf16 (the dispatched path): within one bf16 rounding of aten's result
    xb = x.bfloat16()
    ref = F.gelu(xb.double(), approximate="tanh")
    aten_err = (F.gelu(xb, approximate="tanh").double() - ref).abs().max()
    assert (gelu_tanh(xb).double() - ref).abs().max() <= 2 * aten_err + 1e-6
    assert gelu_tanh(x.view(3, 100, 70)).shape == (3, 100, 70)


def test_single_document_rows_take_the_causal_path():
    from mmkit.models.chameleon.model import build_attention_mask

    one_doc = torch.tensor([[3] * 6, [5] * 6])
    assert build_attention_mask(6, 0, None, one_doc, "cpu") == (None, True)
    two_docs = torch.tensor([[3] * 3 + [4] * 3, [5] * 6])
    mask, is_causal = build_attention_mask(6, 0, None, two_docs, "cpu")
    assert not is_causal and mask.shape == (2, 1, 6, 6) and not bool(mask[0, 0, 3, 2])
