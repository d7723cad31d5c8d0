"""MoE decoder (DeepSeek-V3 / Moonlight): parity with transformers, cache, save/load, balancing."""

from __future__ import annotations

import pytest
import torch

from mmkit.models.kimivl.decoder import MoECausalLM, MoEDecoderConfig, convert_deepseek_v3_state_dict
from mmkit.models.kimivl.load_deepseek import load_deepseek_v3, save_deepseek_v3

TINY = dict(vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
            routed_scaling_factor=2.5, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
            n_group=2, topk_group=1, num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=128)


def _hf_model(q_lora_rank):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**TINY, q_lora_rank=q_lora_rank,
                           rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    hf = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.3)  # large enough to change the selection
    return hf


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_parity_with_transformers_deepseek_v3(tmp_path, q_lora_rank):
    hf = _hf_model(q_lora_rank)
    hf.save_pretrained(tmp_path)  # the Moonlight on-disk format: per-expert keys
    if q_lora_rank is None:
        model = load_deepseek_v3(tmp_path)
    else:  # the one loader for all families dispatches model_type "deepseek_v3" here
        from mmkit.models import load_model

        model = load_model(tmp_path)
    assert isinstance(model, MoECausalLM)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
    ids = torch.randint(0, TINY["vocab_size"], (2, 19))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # the bias changes the routing: zeroing it must change the output
    with torch.no_grad():
        for m in model.model.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        assert (model(ids).logits - ref).abs().max() > 1e-3

    # left padding: with HF given the same mask and positions, valid positions agree
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[0, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    model = load_deepseek_v3(tmp_path)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = model(ids, attention_mask=mask).logits  # positions derived from the mask
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)
    # ... and a left-padded row equals the same tokens run alone
    with torch.no_grad():
        alone = model(ids[:1, 5:]).logits
    torch.testing.assert_close(out[0, 5:], alone[0], atol=1e-4, rtol=0)


def test_cached_decode_equals_full_forward():
    cfg = MoEDecoderConfig(**{k: v for k, v in TINY.items() if k != "num_key_value_heads"}, q_lora_rank=16)
    model = MoECausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.make_cache(2, 16)
        assert cache.latent.shape[-1] == cfg.kv_lora_rank and cache.k_rope.shape[-1] == cfg.qk_rope_head_dim
        steps = [model(ids[:, :6], attention_mask=mask, cache=cache, cache_position=0).logits]
        steps.append(model(ids[:, 6:9], attention_mask=mask, cache=cache, cache_position=6).logits)  # chunk
        for t in range(9, 14):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask, cache=cache, cache_position=t).logits)
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="overflow"):
        model(ids[:, :3], cache=cache, cache_position=14)


def test_save_load_round_trip_and_transformers_reads_it(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    cfg = MoEDecoderConfig(**{k: v for k, v in TINY.items() if k != "num_key_value_heads"}, rope_theta=2000.0)
    model = MoECausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.2)
    save_deepseek_v3(model, tmp_path)
    back = load_deepseek_v3(tmp_path)
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    assert back.model.layers[2].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, cfg.vocab_size, (1, 11))
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    # the converter accepts transformers' fused in-memory layout too
    fused = convert_deepseek_v3_state_dict(hf.state_dict(), cfg.num_hidden_layers)
    for k in sd:
        torch.testing.assert_close(fused[k], sd[k], atol=0, rtol=0)


def test_training_loss_aux_and_expert_load():
    cfg = MoEDecoderConfig(aux_loss_alpha=0.01, n_routed_experts=8, num_experts_per_tok=2)
    model = MoECausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    logits, loss = model(ids, labels=ids)
    aux = model.aux_loss
    assert aux is not None and aux.item() > 0
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ce + aux)
    loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0  # aux loss reaches the router
    stats = model.expert_load()
    counts = model.model.expert_counts()
    assert counts.shape == (1, 8) and counts.sum().item() == 2 * 10 * 2  # every token x top-k counted
    assert stats["moe/load_max"] >= 1.0 >= stats["moe/load_min"]
    model.update_balancing_bias()
    assert model.model.expert_counts().sum().item() == 0
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_torch(dtype):
    from mmkit.models.kimivl.decoder import causal_lm_loss

    logits = (torch.randn(2, 150, 300) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 300, (2, 150))
    labels[0, :9] = -100
    loss = causal_lm_loss(logits, labels)
    (grad,) = torch.autograd.grad(loss * 1.7, logits)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300).float(), labels[:, 1:].reshape(-1))
    (grad_ref,) = torch.autograd.grad(ref * 1.7, logits)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-6, rtol=1e-2)
    assert grad[0, :8].abs().sum() == 0  # ignored targets get no gradient
