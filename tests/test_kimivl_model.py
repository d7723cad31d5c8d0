"""Kimi-VL family (vision side + whole model): parity with transformers' Kimi-K2.5, the
Kimi-VL checkpoint layout, packing, save/load."""

import json

import pytest
import torch

from mmkit.models.kimivl.config import MmkitKimiVLConfig
from mmkit.models.kimivl.load import (KIMIVL_TO_MMKIT, K25_TO_MMKIT, MMKIT_TO_KIMIVL, convert_kimi_k25_state_dict,
                                      interleaved_to_rotate_half, k25_to_kimivl_state_dict, load_model, rename,
                                      rotate_half_to_interleaved)
from mmkit.models.kimivl.model import MmkitKimiVLForConditionalGeneration

IMG = 100  # placeholder id in the tiny vocab
TEXT_CFG = dict(vocab_size=128, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
                num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16,
                q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.446,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
# patch grids (h, w): two different sizes, a repeat (batched SDPA path), and one taller
# than the 4x4 position table (bicubic upsampling)
GRIDS = [[1, 6, 8], [1, 4, 4], [1, 10, 6], [1, 4, 4]]


def _hf_k25():
    from transformers.models.kimi_k25 import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    vc = dict(patch_size=14, pos_emb_height=4, pos_emb_width=4, num_attention_heads=4, num_hidden_layers=2,
              hidden_size=64, intermediate_size=96, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    cfg = Kimi_K25Config(text_config=dict(model_type="deepseek_v3", **TEXT_CFG), vision_config=vc,
                         projection_hidden_size=64, tie_word_embeddings=False, image_token_id=IMG, video_token_id=128)
    torch.manual_seed(0)
    hf = Kimi_K25ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)  # non-zero: affects expert choice only
    return hf


def _inputs(grids=GRIDS, seed=1):
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor(grids)
    pv = torch.randn(int(grids.prod(-1).sum()), 3, 14, 14, generator=g)
    ids = [1, 7]
    for n in (grids.prod(-1) // 4).tolist():
        ids += [3] + [IMG] * n + [4] + [5, 6]
    return torch.tensor([ids]), pv, grids


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = _hf_k25()
    d = tmp_path_factory.mktemp("k25")
    hf.save_pretrained(d, save_original_format=False)
    ids, pv, grids = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv, image_grid_thw=grids).logits
    return d, hf, ref


def test_load_kimi_k25_native_parity(hf_dir):
    d, hf, ref = hf_dir
    assert json.loads((d / "config.json").read_text())["model_type"] == "kimi_k25"
    import mmkit.models as models

    model = models.load_model(d)  # the one loader, dispatching on model_type
    assert isinstance(model, MmkitKimiVLForConditionalGeneration)
    ids, pv, grids = _inputs()
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pv, image_grid_thw=grids).logits
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-4
    # image features alone (vision + merge + projector) also match, image by image
    with torch.no_grad():
        ours = model.get_image_features(pv, grids)
        theirs = torch.cat(hf.get_image_features(pv, grids).pooler_output)
    assert (ours - theirs).abs().max().item() < 1e-5


def test_kimivl_layout_round_trip(hf_dir, tmp_path):
    """A Kimi-VL-layout checkpoint (fused interleaved wqkv, per-expert weights) written from the
    transformers model loads to the same logits."""
    from safetensors.torch import save_file

    d, hf, ref = hf_dir
    cfg = hf.config
    sd = k25_to_kimivl_state_dict(hf.state_dict(), cfg.vision_config.num_attention_heads)
    assert "vision_tower.encoder.blocks.1.wqkv.weight" in sd
    assert "language_model.model.layers.1.mlp.experts.3.down_proj.weight" in sd
    assert "multi_modal_projector.linear_2.weight" in sd
    assert not any(k.startswith("model.") for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    kimi_cfg = {
        "model_type": "kimi_vl", "media_placeholder_token_id": IMG, "ignore_index": -100,
        "vision_config": {"model_type": "moonvit", "patch_size": 14, "init_pos_emb_height": 4,
                          "init_pos_emb_width": 4, "num_attention_heads": 4, "num_hidden_layers": 2,
                          "hidden_size": 64, "intermediate_size": 96, "merge_kernel_size": [2, 2]},
        "text_config": dict(TEXT_CFG, rope_theta=10000.0, topk_method="noaux_tc", scoring_func="sigmoid"),
    }
    (tmp_path / "config.json").write_text(json.dumps(kimi_cfg))
    model = load_model(tmp_path)
    ids, pv, grids = _inputs()
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pv, image_grid_thw=grids).logits
    assert (out - ref).abs().max().item() < 1e-4


def test_key_tables_and_rope_permutation():
    assert rename("model.vision_tower.layers.3.norm1.weight", K25_TO_MMKIT) == "vision_tower.blocks.3.norm0.weight"
    assert rename("model.vision_tower.layers.3.mlp.fc2.bias", K25_TO_MMKIT) == "vision_tower.blocks.3.mlp.fc1.bias"
    assert rename("model.mm_projector.in_proj.weight", K25_TO_MMKIT) == "multi_modal_projector.linear_1.weight"
    assert rename("vision_tower.encoder.blocks.0.wqkv.weight", KIMIVL_TO_MMKIT) == "vision_tower.blocks.0.attn.wqkv.weight"
    assert rename("vision_tower.encoder.final_layernorm.bias", KIMIVL_TO_MMKIT) == "vision_tower.final_layernorm.bias"
    for k in ("vision_tower.encoder.blocks.5.mlp.fc0.weight", "vision_tower.patch_embed.pos_emb.weight",
              "vision_tower.encoder.blocks.2.norm1.bias", "multi_modal_projector.pre_norm.weight"):
        assert rename(rename(k, KIMIVL_TO_MMKIT), MMKIT_TO_KIMIVL) == k
    w = torch.randn(2 * 8, 5)  # 2 heads of dim 8
    rh = interleaved_to_rotate_half(w, 2)
    assert torch.equal(rh[1], w[2]) and torch.equal(rh[4], w[1])  # pair 0 = rows (0, 1) -> (0, 4)
    assert torch.equal(rotate_half_to_interleaved(rh, 2), w)
    with pytest.raises(Exception, match="unexpected"):
        convert_kimi_k25_state_dict({"model.vision_tower.bogus": torch.zeros(1)}, 2)


def _tiny_model(seed=0, **vision):
    torch.manual_seed(seed)
    vc = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, pos_emb_height=4,
              pos_emb_width=4)
    vc.update(vision)
    cfg = MmkitKimiVLConfig(vision_config=vc, text_config=dict(TEXT_CFG, rope_theta=10000.0), image_token_id=IMG,
                            boi_token_id=3, eoi_token_id=4)
    return MmkitKimiVLForConditionalGeneration(cfg).eval()


def test_packed_images_equal_separate_runs():
    model = _tiny_model()
    _, pv, grids = _inputs()
    with torch.no_grad():
        packed = model.vision_tower(pv, grids)
        sep, off = [], 0
        for g in grids:
            n = int(g.prod())
            sep.append(model.vision_tower(pv[off:off + n], g[None]))
            off += n
        feats_packed = model.get_image_features(pv, grids)
        feats_sep = torch.cat([model.get_image_features(pv[o:o + int(g.prod())], g[None])
                               for o, g in zip([0] + grids.prod(-1).cumsum(0)[:-1].tolist(), grids)])
    assert (packed - torch.cat(sep)).abs().max().item() < 1e-5
    assert (feats_packed - feats_sep).abs().max().item() < 1e-5
    assert feats_packed.shape == (int(grids.prod(-1).sum()) // 4, TEXT_CFG["hidden_size"])


def test_save_load_round_trip_and_loss(tmp_path):
    import mmkit.models as models

    model = _tiny_model()
    ids, pv, grids = _inputs()
    labels = ids.clone()
    labels[ids == IMG] = -100
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mmkit_kimivl"
    again = models.load_model(tmp_path)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pv, image_grid_thw=grids, labels=labels)
        b = again(input_ids=ids, pixel_values=pv, image_grid_thw=grids, labels=labels)
    assert torch.equal(a.logits, b.logits)
    # loss = mean next-token CE over the non-ignored targets
    logp = torch.log_softmax(a.logits[0, :-1], -1)
    tgt = labels[0, 1:]
    keep = tgt != -100
    manual = -logp[keep].gather(-1, tgt[keep, None]).mean()
    assert abs(a.loss.item() - manual.item()) < 1e-5
    with pytest.raises(ValueError, match="placeholder"):
        model(input_ids=ids[:, :-8], pixel_values=pv, image_grid_thw=grids)


def test_cached_generation_matches_full_forward():
    model = _tiny_model()
    ids, pv, grids = _inputs(GRIDS[:2])
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pv, image_grid_thw=grids).logits
        T = ids.shape[1]
        cache = model.make_cache(1, T + 4)
        pre = model(input_ids=ids[:, :-3], pixel_values=pv, image_grid_thw=grids, cache=cache, cache_position=0)
        steps = [model(input_ids=ids[:, t:t + 1], cache=cache, cache_position=t).logits for t in range(T - 3, T)]
    assert (pre.logits - full[:, :-3]).abs().max().item() < 1e-5
    assert (torch.cat(steps, 1) - full[:, -3:]).abs().max().item() < 1e-5


def test_auto_classes_and_peft_lora(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = _tiny_model()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is MmkitKimiVLConfig
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(auto, MmkitKimiVLForConditionalGeneration)

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["wqkv", "q_proj", "o_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids, pv, grids = _inputs(GRIDS[:2])
    labels = ids.masked_fill(ids == IMG, -100)
    peft_model.train()
    out = peft_model(input_ids=ids, pixel_values=pv, image_grid_thw=grids, labels=labels)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_activation_checkpointing_same_gradients():
    model = _tiny_model().train()
    ids, pv, grids = _inputs(GRIDS[:2])
    labels = ids.masked_fill(ids == IMG, -100)

    def grads():
        model.zero_grad()
        model(input_ids=ids, pixel_values=pv, image_grid_thw=grids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    model.enable_activation_checkpointing()
    got = grads()
    assert ref.keys() == got.keys() and len(ref) > 20
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-6


@pytest.mark.parametrize("out_hw", [(3, 7), (4, 4), (10, 6), (13, 2)])
def test_position_grid_resampling_equals_bicubic_interpolate(out_hw):
    from mmkit.models.kimivl.vision import MoonViT
    from mmkit.models.kimivl.config import MoonViTConfig

    vit = MoonViT(MoonViTConfig(hidden_size=8, num_hidden_layers=0, num_attention_heads=2, pos_emb_height=4,
                                pos_emb_width=5))
    table = vit.patch_embed.pos_emb.weight  # (4, 5, 8)
    ref = torch.nn.functional.interpolate(table.permute(2, 0, 1)[None], size=out_hw, mode="bicubic",
                                          align_corners=False)[0].permute(1, 2, 0).reshape(-1, 8)
    ours = vit.patch_embed.position_embeddings([out_hw])
    assert (ours - ref).abs().max().item() < 1e-6
