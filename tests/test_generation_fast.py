"""Decode speed-ups change no tokens: packed CPU weights, code-rows-only lm_head in image spans,
the fp32 CPU cache under bf16 weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mmkit.generation import SamplingParams, generate, image_layout_from_config
from mmkit.generation.packing import packed_linears, packing_available

_spec = importlib.util.spec_from_file_location("_tg", Path(__file__).with_name("test_generation.py"))
_tg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tg)
tiny_chameleon, prompts = _tg.tiny_chameleon, _tg.prompts
BOS, BOI, EOI, EOR, OFF, NCODES = _tg.BOS, _tg.BOI, _tg.EOI, _tg.EOR, _tg.OFF, _tg.NCODES

needs_packing = pytest.mark.skipif(not packing_available(torch.zeros(1)), reason="no oneDNN on this build")


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_match_plain_and_follow_weight_updates(dtype):
    model = tiny_chameleon().to(dtype)
    ids = torch.tensor(prompts([9])).long()
    with torch.inference_mode():
        plain = model(ids).logits
        with packed_linears(model):
            assert "forward" in model.lm_head.__dict__
            packed = model(ids).logits
        assert "forward" not in model.lm_head.__dict__  # patch removed on exit
        if dtype == torch.bfloat16:  # oneDNN is what F.linear runs in bf16 too: same numbers here
            assert torch.equal(packed, plain)
        else:  # fp32: another summation order
            torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
        model.lm_head.weight.mul_(2.0)  # in-place update: the cached packed copy must be rebuilt
        with packed_linears(model):
            again = model(ids).logits
        torch.testing.assert_close(again.float(), model(ids).logits.float(), rtol=1e-2, atol=1e-2)
        assert not torch.allclose(again.float(), packed.float())


class _FullLogits(torch.nn.Module):
    """Hides `return_logits` from the sampler: every step computes the whole vocabulary."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def make_cache(self, *a, **k):
        return self.inner.make_cache(*a, **k)

    def forward(self, input_ids, **kw):
        return self.inner(input_ids, **kw)


@pytest.mark.parametrize("rows", [False, True])
def test_code_rows_head_equals_full_vocab(rows):
    kw = dict(eor_token_id=EOR, size_token_offset=100, max_grid_size=8) if rows else {}
    model = tiny_chameleon(**kw)
    layout = image_layout_from_config(model.config)
    ids = torch.tensor([[BOS, 80, 81, 82, BOI]] * 2)
    u_ids = torch.tensor([[BOS, 90, BOI]])
    for extra in (dict(image_sampling=SamplingParams()),  # greedy
                  dict(image_sampling=SamplingParams(do_sample=True, temperature=0.9), seed=[3, 4]),
                  dict(image_sampling=SamplingParams(), cfg_scale=3.0, uncond_input_ids=u_ids)):
        fast = generate(model, ids, 100, mode="image", **extra)
        full = generate(_FullLogits(model), ids, 100, mode="image", **extra)
        assert fast.shape == (2, layout.span_len) and torch.equal(fast, full)
        assert (fast[:, -1] == EOI).all()


def test_bf16_cpu_cache_is_fp32_and_decode_logits_match_no_cache():
    """bf16 weights on CPU get an fp32 cache (fast fp32 attention); logits stay within bf16
    rounding of the no-cache forward (greedy may flip near-ties vs bf16 attention, fp32 stays exact)."""
    model = tiny_chameleon().to(torch.bfloat16)
    ids = torch.tensor(prompts([9], seed=5))
    cache = model.make_cache(1, 16, torch.bfloat16, "cpu")
    assert cache.k.dtype == torch.float32
    with torch.inference_mode():
        model(ids[:, :-1], cache=cache, cache_position=0)
        pos = torch.tensor([[ids.shape[1] - 1]])
        step = model(ids[:, -1:], position_ids=pos, cache=cache, cache_position=ids.shape[1] - 1).logits[0, -1]
        full = model(ids).logits[0, -1]
    assert step.dtype == torch.bfloat16
    torch.testing.assert_close(step.float(), full.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, dict(swin_norm=True, num_key_value_heads=1)])
def test_decode_step_equals_forward_bit_for_bit(dtype, kw):
    from mmkit.generation import left_pad

    model = tiny_chameleon(**kw).to(dtype)
    with torch.no_grad():  # non-trivial QK-norm affine
        for layer in model.model.layers:
            for norm in (layer.attn.q_norm, layer.attn.k_norm):
                norm.weight.normal_(1.0, 0.3)
                norm.bias.normal_(0.0, 0.3)
    ids, mask = left_pad(prompts([7, 4], seed=6), 0)
    T = ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [model.make_cache(2, T + 3, dtype, "cpu") for _ in range(2)]
    with torch.inference_mode():
        for c in caches:
            model(ids, position_ids=pos, attention_mask=mask, cache=c, cache_position=0)
        tok, p = torch.tensor([[50], [60]]), pos[:, -1:] + 1
        for step in range(3):
            m = full_mask[:, :T + step + 1]
            a = model(tok, position_ids=p, attention_mask=m, cache=caches[0], cache_position=T + step,
                      logits_to_keep=1).logits[:, -1]
            b = model.decode_step(tok, p, caches[1], T + step, attention_mask=m)
            assert torch.equal(a, b)
            h = model.decode_step(tok, p, caches[1], T + step, attention_mask=m, return_logits=False)
            assert torch.equal(model.lm_head(h), b)
            tok, p = a.argmax(-1, keepdim=True), p + 1


def test_text_rows_head_equals_full_vocab():
    """Text mode multiplies by lm_head's non-code rows only: same tokens as the full vocabulary."""
    from mmkit.generation import left_pad

    model = tiny_chameleon()
    ids, mask = left_pad(prompts([6, 3], seed=7), 0)
    for kw in (dict(), dict(repetition_penalty=1.3), dict(do_sample=True, temperature=0.8, seed=[1, 2]),
               dict(do_sample=True, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=[3, 4], suppress_tokens=[70])):
        fast = generate(model, ids, 16, attention_mask=mask, **kw)
        full = generate(_FullLogits(model), ids, 16, attention_mask=mask, **kw)
        assert torch.equal(fast, full), kw
        assert not ((fast >= OFF) & (fast < OFF + NCODES)).any()
