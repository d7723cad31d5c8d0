"""Greedy tokens on a transformers Chameleon checkpoint loaded with mmkit.load_model ==
transformers' own `generate(do_sample=False)` on the same weights."""

from __future__ import annotations

import pytest
import torch

import mmkit
from mmkit.generation import generate, left_pad

V, NIMG, BOI, EOI, IMG = 320, 64, 70, 69, 71


def _hf_checkpoint(tmp_path, swin=False, kv=2):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from mmkit.models.chameleon.load import image_code_name

    vm = {image_code_name(c): 4 + c for c in range(NIMG)}
    vm.update({"<racm3:break>": BOI, "<eoss>": EOI, "<image>": IMG, "<s>": 1, "</s>": 2, "<pad>": 3})
    vq = dict(embed_dim=32, num_embeddings=NIMG, latent_channels=32, resolution=32, base_channels=32,
              channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[])
    cfg = ChameleonConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=kv, vocabulary_map=vm, vq_config=vq,
                          swin_norm=swin, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    hf = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # non-trivial QK-norm affine
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
            elif name == "lm_head.weight":  # image-code rows dominate: masking them matters
                p[4:4 + NIMG] *= 3
    hf.save_pretrained(tmp_path / "hf")
    return hf, mmkit.load_model(tmp_path / "hf")


@pytest.mark.parametrize("swin,kv", [(False, 2), (True, 4)])
def test_greedy_equals_transformers_generate(tmp_path, swin, kv):
    hf, ours = _hf_checkpoint(tmp_path, swin, kv)
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.tensor([[1]]), torch.randint(80, V, (1, 9), generator=g)], 1)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[:, ids.shape[1]:]
    new = mmkit.generate(ours, ids, max_new_tokens=24, do_sample=False)  # the top-level entry point
    assert torch.equal(new, ref[:, :new.shape[1]])
    assert new.shape[1] == ref.shape[1] or int(new[0, -1]) == 2


def test_left_padded_batch_equals_transformers_per_prompt(tmp_path):
    hf, ours = _hf_checkpoint(tmp_path)
    g = torch.Generator().manual_seed(2)
    seqs = [[1] + torch.randint(80, V, (n,), generator=g).tolist() for n in (4, 9, 6)]
    ids, mask = left_pad(seqs, 3)
    new = generate(ours, ids, 16, attention_mask=mask)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([s]), max_new_tokens=16, do_sample=False)[0, len(s):]
        assert torch.equal(new[i, :len(ref)], ref)


def _has_hf_generate():
    from mmkit.models.chameleon.model import MmkitChameleonForCausalLM

    return hasattr(MmkitChameleonForCausalLM, "generate")


@pytest.mark.xfail(not _has_hf_generate(), reason="MmkitChameleonForCausalLM lacks GenerationMixin (Chameleon owner)",
                   raises=AttributeError, strict=True)
def test_transformers_generate_still_works_on_mmkit_model(tmp_path):
    """Users' habit: `model.generate(...)` (transformers) on an mmkit model, text only."""
    _, ours = _hf_checkpoint(tmp_path)
    ids = torch.tensor([[1, 100, 101, 102, 103]])
    image_ids = list(range(4, 4 + NIMG))  # what transformers' Chameleon masks in its forward
    with torch.no_grad():
        theirs = ours.generate(ids, max_new_tokens=12, do_sample=False, suppress_tokens=image_ids)[:, ids.shape[1]:]
    assert torch.equal(generate(ours, ids, 12)[:, :theirs.shape[1]], theirs)
