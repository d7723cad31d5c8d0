"""Sampling core on the Kimi-VL family (MLA latent cache, images in the prefill)."""

from __future__ import annotations

import pytest
import torch

from mmkit.generation import generate, left_pad
from mmkit.generation.reference import reference_greedy

IMG, BOI, EOI, PAD, BOS, EOS = 100, 3, 4, 0, 1, 2
TEXT_CFG = dict(vocab_size=128, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
                num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16,
                q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.446,
                bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, rope_theta=10000.0)


@pytest.fixture(scope="module")
def model():
    from mmkit.models.kimivl.config import MmkitKimiVLConfig
    from mmkit.models.kimivl.model import MmkitKimiVLForConditionalGeneration

    torch.manual_seed(0)
    vc = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, pos_emb_height=4,
              pos_emb_width=4)
    cfg = MmkitKimiVLConfig(vision_config=vc, text_config=TEXT_CFG, image_token_id=IMG, boi_token_id=BOI,
                            eoi_token_id=EOI, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    m = MmkitKimiVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger weights: less flat logits, a more telling comparison
        for p in m.language_model.parameters():
            p.mul_(4.0)
    return m


def _row(grid_hw, text, seed):
    g = torch.Generator().manual_seed(seed)
    n = grid_hw[0] * grid_hw[1] // 4
    ids = [BOS] + [BOI] + [IMG] * n + [EOI] + torch.randint(10, 100, (text,), generator=g).tolist()
    pix = torch.randn(grid_hw[0] * grid_hw[1], 3, 14, 14, generator=g)
    return ids, pix, torch.tensor([[1, *grid_hw]])


def test_kimivl_fast_equals_full_recompute_with_image_prefill(model):
    ids, pix, grid = _row((4, 4), 5, seed=0)
    ids = torch.tensor([ids])
    fast = generate(model, ids, 12, eos_token_id=-1, prefill_kwargs=dict(pixel_values=pix, image_grid_thw=grid))
    ref = reference_greedy(model, ids, 12, pixel_values=pix, image_grid_thw=grid)
    assert fast.shape == (1, 12) and torch.equal(fast, ref)


def test_kimivl_left_padded_batch_equals_unbatched(model):
    rows = [_row((4, 4), 3, seed=1), _row((4, 6), 7, seed=2), _row((4, 4), 1, seed=3)]
    ids, mask = left_pad([r[0] for r in rows], PAD)
    pix = torch.cat([r[1] for r in rows])
    grid = torch.cat([r[2] for r in rows])
    batched = generate(model, ids, 10, attention_mask=mask, eos_token_id=-1,
                       prefill_kwargs=dict(pixel_values=pix, image_grid_thw=grid))
    ref = reference_greedy(model, ids, 10, attention_mask=mask, pixel_values=pix, image_grid_thw=grid)
    assert torch.equal(batched, ref)
    for i, (r_ids, r_pix, r_grid) in enumerate(rows):
        alone = generate(model, torch.tensor([r_ids]), 10, eos_token_id=-1,
                         prefill_kwargs=dict(pixel_values=r_pix, image_grid_thw=r_grid))
        assert torch.equal(alone[0], batched[i])
