"""Loading transformers' ChameleonVQVAE (encoder + quantizer) reproduces its codes."""

import torch

from mmkit.vq.chameleon import from_chameleon_vqvae, load_chameleon_vq


def _tiny_hf():
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    cfg = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=16, resolution=32, in_channels=3,
                               base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[32])
    torch.manual_seed(0)
    m = ChameleonVQVAE(cfg).eval()
    with torch.no_grad():  # codebook = actual latents, so many different codes are hit
        z = m.quant_conv(m.encoder(torch.rand(4, 3, 32, 32) * 2 - 1)).permute(0, 2, 3, 1).reshape(-1, 8)
        m.quantize.embedding.weight.copy_(z[torch.randperm(len(z))[:64]])
    return m


def test_chameleon_vqvae_codes_reproduced(tmp_path):
    hf = _tiny_hf()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = hf.encode(x).image_tokens.view(3, 16, 16)
    ours = from_chameleon_vqvae(hf)
    assert ours.config.attn_levels == [0] and ours.downsample == 2 and ours.codebook_size == 64
    codes = ours.encode(x)
    assert len(torch.unique(ref)) > 8
    assert torch.equal(codes, ref)
    # from a checkpoint directory, with the ChameleonForConditionalGeneration key prefix
    from safetensors.torch import save_file
    import json

    state = {f"model.vqmodel.{k}": v.contiguous() for k, v in hf.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chameleon", "vq_config": hf.config.to_dict()}))
    assert torch.equal(load_chameleon_vq(tmp_path).encode(x), ref)
