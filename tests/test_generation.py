"""Sampling core: fast path == full recompute, batching, constraints, CFG, seeds, filters."""

from __future__ import annotations

import pytest
import torch

from mmkit.generation import SamplingParams, generate, image_layout_from_config, left_pad
from mmkit.generation.reference import reference_greedy
from mmkit.generation.sampler import sample_tokens
from mmkit.models.chameleon.config import MmkitChameleonConfig
from mmkit.models.chameleon.model import MmkitChameleonForCausalLM

PAD, BOS, EOS, BOI, EOI, EOR, OFF, NCODES = 0, 1, 2, 3, 4, 5, 16, 48
TEXT_IDS = (OFF + NCODES, 200)


def tiny_chameleon(**kw) -> MmkitChameleonForCausalLM:
    cfg = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, boi_token_id=BOI,
               eoi_token_id=EOI, image_token_offset=OFF, num_image_tokens=NCODES, image_grid_h=3, image_grid_w=4,
               max_position_embeddings=256)
    cfg.update(kw)
    torch.manual_seed(0)
    return MmkitChameleonForCausalLM(MmkitChameleonConfig(**cfg)).eval()


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(*TEXT_IDS, (n - 1,), generator=g).tolist() for n in lengths]


def test_greedy_fast_equals_full_recompute_batched_and_unbatched():
    model = tiny_chameleon()
    seqs = prompts([7, 3, 5])
    ids, mask = left_pad(seqs, PAD)
    fast = generate(model, ids, 24, attention_mask=mask)
    ref = reference_greedy(model, ids, 24, attention_mask=mask, suppress_ids=range(OFF, OFF + NCODES),
                           eos_token_id=EOS, pad_token_id=PAD)
    assert fast.shape == ref.shape == (3, 24)
    assert torch.equal(fast, ref)
    for i, s in enumerate(seqs):  # batched (left padded) == each prompt alone
        alone = generate(model, torch.tensor([s]), 24)
        assert torch.equal(alone[0], fast[i])
    # text mode never emits image codes
    assert not ((fast >= OFF) & (fast < OFF + NCODES)).any()


def test_gqa_and_swin_norm_fast_equals_reference():
    model = tiny_chameleon(swin_norm=True, num_key_value_heads=1)
    ids, mask = left_pad(prompts([4, 6], seed=1), PAD)
    fast = generate(model, ids, 16, attention_mask=mask)
    ref = reference_greedy(model, ids, 16, attention_mask=mask, suppress_ids=range(OFF, OFF + NCODES))
    assert torch.equal(fast, ref)


def test_stops_at_eos_and_pads_finished_rows(biased):
    model = biased(tiny_chameleon(), {EOS: 4.0})
    ids, mask = left_pad(prompts([5, 8], seed=2), PAD)
    out = generate(model, ids, 30, attention_mask=mask)
    ref = reference_greedy(model, ids, 30, attention_mask=mask, suppress_ids=range(OFF, OFF + NCODES),
                           eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out, ref)
    assert out.shape[1] < 30  # stopped early: every row hit eos
    for row in out.tolist():
        k = row.index(EOS)
        assert all(t == PAD for t in row[k + 1:])


def _check_spans(tokens: list[int], layout, budget: int) -> int:
    """Assert the image-span grammar on one row; return the number of complete spans."""
    tmpl = layout.template()
    i, spans = 0, 0
    while i < len(tokens):
        t = tokens[i]
        if t == BOI:
            assert i + len(tmpl) < budget, "boi opened without room for a whole image"
            span = tokens[i + 1:i + 1 + len(tmpl)]
            for got, want in zip(span, tmpl):
                if want == -1:
                    assert OFF <= got < OFF + NCODES
                else:
                    assert got == want
            assert len(span) == len(tmpl)
            codes = layout.codes_from_span(span)
            assert codes.shape == (layout.h, layout.w)
            spans += 1
            i += 1 + len(tmpl)
        else:
            assert not OFF <= t < OFF + NCODES and t not in (EOI, EOR), f"{t} outside a span"
            i += 1
    return spans


@pytest.mark.parametrize("rows", [False, True])
def test_interleaved_spans_have_exactly_h_w_codes(rows, biased):
    kw = dict(eor_token_id=EOR, size_token_offset=100, max_grid_size=8) if rows else {}
    base = tiny_chameleon(**kw)
    model = biased(base, {BOI: 6.0, EOS: -1e4})
    layout = image_layout_from_config(base.config)
    budget = 3 * (layout.span_len + 1) + 4
    ids, mask = left_pad(prompts([4, 6, 5], seed=3), PAD)
    out = generate(model, ids, budget, attention_mask=mask, mode="interleaved", do_sample=True, temperature=1.0,
                   seed=[1, 2, 3])
    assert out.shape == (3, budget)
    n = sum(_check_spans(row, layout, budget) for row in out.tolist())
    assert n >= 3  # boi was strongly favoured: spans were actually generated
    # boi refused near the end: no row ends inside a span
    assert all(row[-1] != BOI for row in out.tolist())


def test_image_mode_one_span_then_stop_and_decodes():
    from mmkit.vq.model import VQModel, preset_config

    base = tiny_chameleon()
    layout = image_layout_from_config(base.config)
    ids = torch.tensor([[BOS, 70, 71, BOI]])
    out = generate(base, ids, 100, mode="image", seed=0)
    assert out.shape == (1, layout.span_len) and out[0, -1] == EOI
    codes = layout.codes_from_span(out[0].tolist())
    # without a trailing boi it is appended: same image
    assert torch.equal(generate(base, ids[:, :-1], 100, mode="image", seed=0), out)
    vq = VQModel(preset_config("shapes-f8", codebook_size=NCODES, base_channels=8, channel_multiplier=[1, 2],
                               latent_channels=8, norm_groups=4, mid_attn=False)).eval()
    img = vq.decode(codes[None])
    assert img.shape == (1, 3, layout.h * vq.downsample, layout.w * vq.downsample)
    assert torch.isfinite(img).all()


def test_cfg_scale_one_equals_no_cfg_and_scale_changes_output():
    model = tiny_chameleon()
    cond = [BOS] + [80, 81, 82, 83, 84] + [BOI]
    unc = [BOS, 90, BOI]  # shorter: left padded inside the [cond; uncond] batch
    ids = torch.tensor([cond, cond])
    u_ids = torch.tensor([unc])
    plain = generate(model, ids, 40, mode="image", seed=[5, 6])
    same = generate(model, ids, 40, mode="image", seed=[5, 6], cfg_scale=1.0, uncond_input_ids=u_ids)
    assert torch.equal(plain, same)
    guided = generate(model, ids, 40, mode="image", seed=[5, 6], cfg_scale=3.0, uncond_input_ids=u_ids)
    assert guided.shape == plain.shape and not torch.equal(guided, plain)
    # greedy CFG equals argmax of c + (s-1)(c-u) computed without a cache, token by token
    g = generate(model, ids[:1], 12, mode="image", cfg_scale=3.0, uncond_input_ids=u_ids,
                 image_sampling=SamplingParams())
    c_seq, u_seq = list(cond), list(unc)
    for step in range(12):
        lc = model(torch.tensor([c_seq])).logits[0, -1]
        lu = model(torch.tensor([u_seq])).logits[0, -1]
        lg = lc + 2.0 * (lc - lu)
        allowed = torch.full_like(lg, float("-inf"))
        allowed[OFF:OFF + NCODES] = 0
        tok = int((lg + allowed).argmax())
        assert tok == int(g[0, step])
        c_seq.append(tok)
        u_seq.append(tok)


def test_seeds_reproducible_and_independent_of_batch():
    model = tiny_chameleon()
    seqs = prompts([6, 4], seed=4)
    ids, mask = left_pad(seqs, PAD)
    kw = dict(do_sample=True, temperature=1.3, top_k=50, top_p=0.95)
    a = generate(model, ids, 20, attention_mask=mask, seed=[11, 12], **kw)
    b = generate(model, ids, 20, attention_mask=mask, seed=[11, 12], **kw)
    assert torch.equal(a, b)
    alone = generate(model, torch.tensor([seqs[1]]), 20, seed=[12], **kw)
    assert torch.equal(alone[0], a[1])
    c = generate(model, ids, 20, attention_mask=mask, seed=[13, 14], **kw)
    assert not torch.equal(a, c)


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 40, generator=g) * 2
    prev = torch.tensor([[3, 5, 5, 9], [0, 1, 2, 39]])
    seen = torch.zeros(2, 40, dtype=torch.bool).scatter_(1, prev, True)
    for top_p in (0.8, 1.0):  # sorted (top-p) and unsorted (top-k only) selection paths
        p = SamplingParams(do_sample=True, temperature=0.7, top_k=12, top_p=top_p, repetition_penalty=1.3)
        ref = RepetitionPenaltyLogitsProcessor(1.3)(prev, logits.clone())
        ref = TopKLogitsWarper(12)(prev, TemperatureLogitsWarper(0.7)(prev, ref))
        ref_probs = (TopPLogitsWarper(top_p)(prev, ref) if top_p < 1 else ref).softmax(-1)
        # inverse-CDF sampling over a fine grid of uniforms hits exactly the kept tokens, with their mass
        n = 4000
        u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        for r in range(2):
            toks = sample_tokens(logits[r:r + 1].expand(n, -1).clone(), p, u, seen[r:r + 1].expand(n, -1))
            freq = torch.bincount(toks, minlength=40).float() / n
            assert set(toks.tolist()) == set(ref_probs[r].nonzero().flatten().tolist())
            assert torch.allclose(freq, ref_probs[r], atol=2e-3)
    # top_k=1 and greedy agree
    greedy = sample_tokens(logits.clone(), SamplingParams(), None)
    one = sample_tokens(logits.clone(), SamplingParams(do_sample=True, top_k=1), torch.rand(2))
    assert torch.equal(greedy, one)


def test_bad_arguments_are_usage_errors():
    from mmkit.errors import UsageError

    model = tiny_chameleon()
    ids = torch.tensor([[BOS, 70]])
    with pytest.raises(UsageError):
        generate(model, ids, 4, temperature=0.0, do_sample=True)
    with pytest.raises(UsageError):
        generate(model, ids, 4, mode="video")
    with pytest.raises(UsageError):
        generate(model, ids, 4, cfg_scale=2.0)


def test_prompt_lookup_equals_plain_greedy(biased):
    model = tiny_chameleon()
    saved = 0
    for seed in range(3):
        s = prompts([9], seed=10 + seed)[0]
        ids = torch.tensor([s + s[1:] + s[1:]])  # a repeated prompt gives the lookup something to copy
        plain = generate(model, ids, 40, eos_token_id=[])
        st = {}
        fast = generate(model, ids, 40, eos_token_id=[], prompt_lookup=4, stats=st)
        assert torch.equal(plain, fast) and st["tokens"] == 40
        saved += 39 - st["forwards"]
    assert saved > 0  # drafts were accepted: fewer forwards than tokens
    eos_likely = biased(model, {EOS: 3.0})  # stops at eos exactly like the plain loop
    ids = torch.tensor([prompts([6], seed=20)[0]])
    assert torch.equal(generate(eos_likely, ids, 30, prompt_lookup=3), generate(eos_likely, ids, 30))
    with pytest.raises(Exception, match="batch-1 greedy"):
        generate(model, torch.cat([ids, ids]), 5, prompt_lookup=2)
