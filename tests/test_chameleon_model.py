"""Chameleon family: parity with transformers, conversion both ways, masks, cache, loss, LoRA."""

import json

import pytest
import torch
import torch.nn.functional as F

import mmkit
from mmkit.models.chameleon.config import MmkitChameleonConfig
from mmkit.models.chameleon.load import (
    GLOBAL_KEYS,
    LAYER_KEYS,
    export_to_transformers,
    image_code_from_name,
    image_code_name,
    state_from_transformers,
    state_to_transformers,
)
from mmkit.models.chameleon.model import MmkitChameleonForCausalLM


V, NIMG, BOI, EOI, IMG = 300, 200, 205, 204, 206


def hf_vocab_map():
    vm = {image_code_name(c): 4 + c for c in range(NIMG)}
    vm.update({"<racm3:break>": BOI, "<eoss>": EOI, "<image>": IMG, "<s>": 1, "</s>": 2})
    return vm


def make_hf(swin=False, kv=4, theta=5000.0):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vq = dict(embed_dim=32, num_embeddings=NIMG, latent_channels=32, resolution=32, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[])
    cfg = ChameleonConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=kv, vocabulary_map=hf_vocab_map(),
                          vq_config=vq, swin_norm=swin, rope_parameters={"rope_type": "default", "rope_theta": theta})
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random (not identity) norms so the affine parts are checked too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    return model


def hf_unmasked_logits(model, ids):
    return model.lm_head(model.model(ids).last_hidden_state)


def tiny_cfg(**kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, image_token_offset=4, num_image_tokens=NIMG, boi_token_id=BOI,
                eoi_token_id=EOI, image_token_id=IMG, max_position_embeddings=128)
    base.update(kw)
    return MmkitChameleonConfig(**base)


def mixed_ids(B=2, T=24):
    """Text ids, image-code ids and boi/eoi in one batch."""
    ids = torch.randint(0, V, (B, T))
    ids[:, 3] = BOI
    ids[:, 4:12] = torch.randint(4, 4 + NIMG, (B, 8))
    ids[:, 12] = EOI
    return ids


@pytest.mark.parametrize("swin,kv", [(False, 4), (True, 4), (False, 2), (True, 1)])
def test_logit_parity_with_transformers(tmp_path, swin, kv):
    hf = make_hf(swin=swin, kv=kv)
    hf.save_pretrained(tmp_path)
    model = mmkit.load_model(tmp_path)
    assert isinstance(model, MmkitChameleonForCausalLM)
    assert (model.config.boi_token_id, model.config.eoi_token_id, model.config.image_token_offset) == (BOI, EOI, 4)
    assert model.config.num_image_tokens == NIMG and model.config.rope_theta == 5000.0
    ids = mixed_ids()
    with torch.no_grad():
        ref = hf_unmasked_logits(hf, ids)
        out = model(ids).logits
    assert out.shape == (2, 24, V)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # image-code columns are real logits (transformers' forward sets them to finfo.min)
    assert torch.isfinite(out[..., 4:4 + NIMG]).all() and out[..., 4:4 + NIMG].abs().max() < 100


@pytest.mark.parametrize("groups", [1, 2])
def test_lumina_qk_norm_shape_loads(tmp_path, groups):
    """q/k-norm stored as [model_parallel_size, hd] (Lumina-mGPT) repeats per head."""
    from safetensors.torch import load_file, save_file

    hf = make_hf(kv=2)
    with torch.no_grad():  # heads of one shard share their affine, as in a model-parallel checkpoint
        for name, p in hf.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.copy_(p[:: p.shape[0] // groups].repeat_interleave(p.shape[0] // groups, dim=0))
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    for k in list(state):
        if "q_norm" in k or "k_norm" in k:
            state[k] = state[k][:: state[k].shape[0] // groups].clone()
            assert state[k].shape[0] == groups
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = mmkit.load_model(tmp_path)
    assert model.model.layers[0].attn.q_norm.weight.shape == (4, 16)
    assert model.model.layers[0].attn.k_norm.weight.shape == (2, 16)
    ids = mixed_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_unmasked_logits(hf, ids), atol=1e-4, rtol=0)


def test_key_mapping_tables_roundtrip():
    cfg = tiny_cfg()
    model = MmkitChameleonForCausalLM(cfg)
    ours = model.state_dict()
    theirs = state_to_transformers(ours, cfg)
    # exactly the transformers key set (minus the VQGAN), every tensor used once
    n_layer_keys = sum(len(v) for v in LAYER_KEYS.values())
    assert len(theirs) == len(GLOBAL_KEYS) + cfg.num_hidden_layers * n_layer_keys
    assert theirs["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert theirs["model.layers.0.mlp.up_proj.weight"].shape == (96, 64)
    back = state_from_transformers(theirs, cfg)
    assert set(back) == set(ours)
    for k in ours:
        assert torch.equal(back[k], ours[k]), k
    assert image_code_from_name(image_code_name(8191)) == 8191


def test_export_to_transformers_roundtrip(tmp_path):
    from transformers import ChameleonForConditionalGeneration

    model = MmkitChameleonForCausalLM(tiny_cfg(swin_norm=True, rope_theta=20000.0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    export_to_transformers(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "chameleon"
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = mixed_ids()
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(hf_unmasked_logits(hf, ids), ref, atol=1e-4, rtol=0)
        back = mmkit.load_model(tmp_path)  # and back again
        torch.testing.assert_close(back(ids).logits, ref, atol=1e-5, rtol=0)
    assert back.config.boi_token_id == BOI and back.config.image_token_offset == 4


def test_save_load_roundtrip_and_auto(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = MmkitChameleonForCausalLM(tiny_cfg(z_loss=1e-5)).eval()
    model.save_pretrained(tmp_path)
    ids = mixed_ids()
    loaded = mmkit.load_model(tmp_path)
    assert type(loaded) is MmkitChameleonForCausalLM and loaded.config.z_loss == 1e-5
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "mmkit_chameleon"
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(loaded(ids).logits, ref)
        assert torch.equal(auto(ids).logits, ref)


def test_document_masking_equals_separate_documents():
    model = MmkitChameleonForCausalLM(tiny_cfg()).eval()
    lens = [7, 11, 5]
    docs = [mixed_ids(1, n) if n > 12 else torch.randint(0, V, (1, n)) for n in lens]
    packed = torch.cat(docs, 1)  # (1, 23)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lens)], 1)
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids).logits
        sep = torch.cat([model(d).logits for d in docs], 1)
        unmasked = model(packed).logits
    torch.testing.assert_close(out, sep, atol=1e-5, rtol=0)
    assert (unmasked[:, lens[0]:] - sep[:, lens[0]:]).abs().max() > 1e-3  # the mask matters


def test_cached_forward_equals_full_forward():
    model = MmkitChameleonForCausalLM(tiny_cfg(swin_norm=True)).eval()
    ids = mixed_ids(2, 20)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_cache(2, 32, torch.float32, "cpu")
        step = [model(ids[:, :12], cache=cache, cache_position=0).logits]
        step.append(model(ids[:, 12:15], cache=cache, cache_position=12).logits)  # chunked prefill
        for t in range(15, 20):
            step.append(model(ids[:, t:t + 1], cache=cache, cache_position=t).logits)
    torch.testing.assert_close(torch.cat(step, 1), full, atol=1e-5, rtol=0)


def test_left_padded_batch_with_cache_equals_unpadded():
    model = MmkitChameleonForCausalLM(tiny_cfg()).eval()
    a, b = torch.randint(0, V, (1, 10)), torch.randint(0, V, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)], 0)  # b left-padded
    attn = torch.ones(2, 13, dtype=torch.long)
    attn[1, :4] = 0
    nxt = torch.randint(0, V, (2, 3))
    with torch.no_grad():
        cache = model.make_cache(2, 16, torch.float32, "cpu")
        pre = model(batch, attention_mask=attn[:, :10], cache=cache, cache_position=0).logits
        steps = [model(nxt[:, i:i + 1], attention_mask=attn[:, :11 + i], cache=cache, cache_position=10 + i).logits
                 for i in range(3)]
        ref_b = model(torch.cat([b, nxt[1:]], 1)).logits
        ref_a = model(torch.cat([a, nxt[:1]], 1)).logits
    got_b = torch.cat([pre[1:, 4:]] + [s[1:] for s in steps], 1)
    got_a = torch.cat([pre[:1]] + [s[:1] for s in steps], 1)
    torch.testing.assert_close(got_b, ref_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_a, ref_a, atol=1e-5, rtol=0)


def test_loss_cross_entropy_z_loss_and_weights():
    model = MmkitChameleonForCausalLM(tiny_cfg(z_loss=1e-3)).eval()
    ids = mixed_ids()
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    logits = out.logits.float()
    ref_ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    lse = torch.logsumexp(logits[:, :-1], -1)[labels[:, 1:] != -100]
    torch.testing.assert_close(out.ce_loss, ref_ce)
    torch.testing.assert_close(out.z_loss, lse.square().mean())
    torch.testing.assert_close(out.loss, ref_ce + 1e-3 * lse.square().mean())
    # per-token weights: image targets at 0 == text-only loss summed over the same count
    w = torch.where(model.config.is_image_token(ids), 0.0, 1.0)
    weighted = model(ids, labels=labels, loss_weights=w).ce_loss
    ce_tok = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="none")
    n = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(weighted, (ce_tok * w[:, 1:].flatten()).sum() / n)


def test_training_loss_runs_the_head_on_supervised_rows_only():
    # return_logits=False with labels: the LM head sees only rows with a target; the loss, the
    # z-loss and every gradient equal the full-logits path (fp32: to rounding).
    model = MmkitChameleonForCausalLM(tiny_cfg(z_loss=1e-3))
    ids = mixed_ids()
    labels = ids.clone()
    labels[:, :9] = -100
    labels[1, 15:20] = -100
    w = torch.where(model.config.is_image_token(ids), 2.0, 1.0)
    outs, grads = [], []
    for full in (True, False):
        model.zero_grad()
        out = model(ids, labels=labels, loss_weights=w, return_logits=full)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert outs[1].logits is None and outs[0].logits is not None
    for k in ("loss", "ce_loss", "z_loss"):
        torch.testing.assert_close(getattr(outs[1], k), getattr(outs[0], k), rtol=1e-6, atol=1e-6)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
    assert grads[1]["lm_head.weight"].abs().sum() > 0


def test_lora_with_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = MmkitChameleonForCausalLM(tiny_cfg())
    ids = mixed_ids()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(ids).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["wqkv", "wo", "w13", "w2"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        tuned = peft_model(input_ids=ids).logits
    assert (tuned - base).abs().max() > 1e-4
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = MmkitChameleonForCausalLM(tiny_cfg())
    fresh.load_state_dict(base_state)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, tuned, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_matches_reference(dtype):
    from mmkit.nn.loss import fused_cross_entropy

    logits = (3 * torch.randn(50, 37)).to(dtype).requires_grad_()
    target = torch.randint(0, 37, (50,))
    target[::7] = -100
    w = torch.rand(50)
    ce, z = fused_cross_entropy(logits, target, w, chunk=8)  # several chunks, ragged last one
    n = (target != -100).sum()
    (ce / n + 0.1 * z / n).backward()
    ref_logits = logits.detach().float().requires_grad_()
    ce_tok = F.cross_entropy(ref_logits, target, ignore_index=-100, reduction="none")
    lse = torch.logsumexp(ref_logits, -1) * (target != -100)
    ref = ((ce_tok * w).sum() + 0.1 * (lse.square() * w).sum()) / n
    ref.backward()
    torch.testing.assert_close(ce / n + 0.1 * z / n, ref)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, atol=tol, rtol=tol)


def test_activation_checkpointing_same_gradients():
    model = MmkitChameleonForCausalLM(tiny_cfg(dropout=0.0))
    ids = mixed_ids()
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


def test_image_pos_embed_rows_columns_cache_and_documents():
    """Option image_pos_embed: codes get (row, column) counted from boi / eor; cached decoding
    (chunked prefill + decode_step) and packed documents give the full-forward numbers."""
    from mmkit.models.chameleon.model import image_grid_state

    EOR, SIZE = 207, 210
    cfg = tiny_cfg(eor_token_id=EOR, size_token_offset=SIZE, max_grid_size=16, image_pos_embed=True)
    model = MmkitChameleonForCausalLM(cfg).eval()
    assert not model.model.grid_embed.row.detach().any()  # zero init: starts as plain Chameleon
    torch.manual_seed(0)
    with torch.no_grad():
        model.model.grid_embed.row.normal_(0, 0.5)
        model.model.grid_embed.col.normal_(0, 0.5)
    h, w = 2, 3
    codes = torch.randint(4, 4 + NIMG, (h, w))
    span = [BOI, SIZE + h, SIZE + w] + [t for r in codes.tolist() for t in r + [EOR]] + [EOI]
    ids = torch.tensor([[1, 240, 250] + span + [260, 270]])  # (1, 17); text ids outside [4, 204)
    state = image_grid_state(ids, cfg)[0]
    cells = [(int(r), int(c) - 1) for (r, c), t in zip(state, ids[0]) if cfg.is_image_token(t)]
    assert cells == [(r, c) for r in range(h) for c in range(w)]
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_cache(1, 32, torch.float32, "cpu")
        got = [model(ids[:, :5], cache=cache, cache_position=0).logits[:, -1:],
               model(ids[:, 5:9], cache=cache, cache_position=5).logits]  # chunked prefill mid-image
        for t in range(9, ids.shape[1]):
            got.append(model.decode_step(ids[:, t:t + 1], torch.tensor([[t]]), cache, t)[:, None])
        torch.testing.assert_close(torch.cat(got, 1), full[:, 4:], atol=1e-5, rtol=0)
        packed = torch.cat([ids, ids], 1)  # the second document's image restarts at row 0
        doc_ids = torch.cat([torch.zeros_like(ids), torch.ones_like(ids)], 1)
        torch.testing.assert_close(model(packed, doc_ids=doc_ids).logits, torch.cat([full, full], 1),
                                   atol=1e-5, rtol=0)
        model.model.grid_embed.col.zero_()
        assert (model(ids).logits - full).abs().max() > 1e-3  # the column embedding is used


@pytest.mark.parametrize("cfg_scale,block", [(1.0, 1), (3.0, 1), (3.0, 2)])
def test_image_pos_embed_sampler_image_mode_matches_full_forward(cfg_scale, block):
    """The fast sampler (prefill + decode_step, CFG rows, left padding) with row/column
    embeddings: greedy codes == the argmax over codes of a full no-cache forward of the result.
    block 2 (image_block): 2 token rows of 8 codes (2x2 blocks), the column table 2x as long."""
    from mmkit.generation.sampler import SamplingParams, generate, image_layout_from_config, left_pad

    EOR, SIZE = 207, 210
    cfg = tiny_cfg(eor_token_id=EOR, size_token_offset=SIZE, max_grid_size=16, image_pos_embed=True,
                   image_grid_h=3 if block == 1 else 4, image_grid_w=4, image_block=block)
    torch.manual_seed(1)
    model = MmkitChameleonForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.grid_embed.row.normal_(0, 1.0)
        model.model.grid_embed.col.normal_(0, 1.0)
    prompts = [[1, 240, 250, 260, BOI], [1, 270, BOI]]
    ids, mask = left_pad(prompts, 0)
    uncond = torch.tensor([[1, 280, BOI]])
    kw = dict(cfg_scale=cfg_scale, uncond_input_ids=uncond) if cfg_scale != 1.0 else {}
    span = image_layout_from_config(cfg).span_len
    assert span == (3 * 5 + 3 if block == 1 else 2 * 9 + 3)
    assert model.model.grid_embed.col.shape[0] == 16 * block
    out = generate(model, ids, span, attention_mask=mask, mode="image",
                   image_sampling=SamplingParams(do_sample=False), **kw)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            seq = torch.tensor([p + out[b].tolist()])
            lg = model(seq).logits[0, len(p) - 1:-1, 4:4 + NIMG].float()  # (new, codes)
            if cfg_scale != 1.0:
                useq = torch.tensor([uncond[0].tolist() + out[b].tolist()])
                ul = model(useq).logits[0, uncond.shape[1] - 1:-1, 4:4 + NIMG].float()
                lg = lg + (cfg_scale - 1.0) * (lg - ul)
            is_code = cfg.is_image_token(out[b])
            assert int(is_code.sum()) == cfg.image_grid_h * cfg.image_grid_w
            assert torch.equal(out[b][is_code], lg.argmax(-1)[is_code] + 4)


def test_export_refuses_image_pos_embed(tmp_path):
    """transformers' Chameleon has no row/column embeddings: exporting would drop trained weights."""
    from mmkit.errors import MmkitError

    cfg = tiny_cfg(eor_token_id=207, size_token_offset=210, max_grid_size=16, image_pos_embed=True)
    with pytest.raises(MmkitError, match="image_pos_embed"):
        export_to_transformers(MmkitChameleonForCausalLM(cfg), tmp_path)


def test_image_bidi_spans_masks_prefill_and_cached_decoding():
    """image_bidi: inside a complete image span every token sees the whole span (an early code's
    output depends on a later code), text before the span does not, an open span (being
    generated) stays causal; a cached prefill + decode steps give the full-forward numbers,
    also left-padded; explicit bidi_ids (training) == the spans found in the ids (inference)."""
    from mmkit.generation.sampler import generate, left_pad
    from mmkit.models.chameleon.model import image_span_ids

    cfg = tiny_cfg(image_bidi=True)
    torch.manual_seed(0)
    model = MmkitChameleonForCausalLM(cfg).eval()
    text = torch.randint(210, V, (1, 20))
    ids = torch.cat([text[:, :3], torch.tensor([[BOI]]), torch.randint(4, 4 + NIMG, (1, 8)), torch.tensor([[EOI]]),
                     text[:, 3:10]], 1)  # text 0-2, boi 3, codes 4-11, eoi 12, text 13-19
    spans = image_span_ids(ids, cfg)
    assert spans[0].tolist() == [0] * 3 + [1] * 10 + [0] * 7
    open_span = ids[:, :10]  # boi without its eoi: a span being generated
    assert not image_span_ids(open_span, cfg).any()
    changed = ids.clone()
    changed[0, 10] = 4 + (int(ids[0, 10]) - 4 + 1) % NIMG  # a later code
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
        assert torch.equal(a[:, :3], b[:, :3])  # text before the span sees none of it
        assert (a[:, 3:10] - b[:, 3:10]).abs().amax(-1).min() > 1e-5  # boi and every earlier code see the later one
        causal = MmkitChameleonForCausalLM(tiny_cfg()).eval()
        causal.load_state_dict(model.state_dict())
        torch.testing.assert_close(causal(ids[:, :3]).logits, a[:, :3])
        assert (causal(ids).logits[:, 4:10] - a[:, 4:10]).abs().max() > 1e-4
        # training passes the spans explicitly: the same numbers
        torch.testing.assert_close(model(ids, bidi_ids=spans).logits, a)
        # greedy decoding after a cached prefill of [image + question] == argmax of full forwards
        prompts = [ids[0, :15].tolist(), [1, 7] + ids[0, 3:13].tolist() + [30]]
        pids, mask = left_pad(prompts, 0)
        out = generate(model, pids, 5, attention_mask=mask, suppress_tokens=list(range(4, 4 + NIMG)) + [BOI])
        for row, p in zip(out, prompts):
            seq = p[:]
            for t in row.tolist():
                lg = model(torch.tensor([seq])).logits[0, -1].clone()
                lg[4:4 + NIMG] = float("-inf")
                lg[[BOI, EOI]] = float("-inf")  # the sampler refuses eoi outside a span
                assert int(lg.argmax()) == t
                seq.append(t)
    # an explicit span needs a fresh pass
    cache = model.make_cache(1, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="fresh pass"):
        model(ids[:, 5:], bidi_ids=spans[:, 5:], cache=cache, cache_position=5)


def test_export_refuses_image_bidi_and_block_order(tmp_path):
    from mmkit.errors import MmkitError

    for kw, word in [({"image_bidi": True}, "image_bidi"), ({"image_block": 2}, "image_block")]:
        with pytest.raises(MmkitError, match=word):
            export_to_transformers(MmkitChameleonForCausalLM(tiny_cfg(**kw)), tmp_path / word)


def test_regionally_compiled_blocks_train_as_eager_in_bf16():
    """The recipe's `train.compile: regional` on packed bf16 rows: inductor compiles each block
    around mmkit's blocked attention (eager inside, `torch.compiler.disable`); loss and gradients
    match eager to bf16 rounding (inductor keeps fused intermediates in fp32)."""
    from mmkit.train.engine import compile_repeated_blocks

    torch.manual_seed(0)
    eager = MmkitChameleonForCausalLM(tiny_cfg(num_key_value_heads=4)).train()
    comp = MmkitChameleonForCausalLM(tiny_cfg(num_key_value_heads=4)).train()
    comp.load_state_dict(eager.state_dict())
    assert compile_repeated_blocks(comp) == 2
    ids = torch.cat([mixed_ids(3, 40), mixed_ids(3, 40)], 1)  # (3, 80): two documents a row
    doc_ids = torch.cat([torch.zeros(3, 40, dtype=torch.long), torch.ones(3, 40, dtype=torch.long)], 1)
    results = []
    for model in (eager, comp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, doc_ids=doc_ids, labels=ids, return_logits=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-2, atol=1e-2)
    for name, g in g0.items():
        cos = F.cosine_similarity(g.flatten().float(), g1[name].flatten().float(), dim=0)
        assert cos > 0.99, (name, float(cos))
