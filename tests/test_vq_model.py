"""VQ image tokenizer: API, persistence, determinism, metrics, errors."""

import json
import math

import pytest
import torch

from mmkit.errors import UsageError
from mmkit.vq.metrics import code_histogram, psnr, ssim, usage_and_perplexity
from mmkit.vq.model import VQModel, preset_config

TINY = dict(base_channels=8, channel_multiplier=[1, 2, 2], latent_channels=8, embed_dim=4, codebook_size=16,
            norm_groups=4, resolution=16)


def tiny(quantizer="vq", **kw):
    extra = {"fsq": dict(fsq_levels=[4, 4]), "lfq": {}}.get(quantizer, {})
    return VQModel(preset_config("shapes-f8", quantizer=quantizer, **{**TINY, **extra, **kw}))


def _images(b=3, h=16, w=24):
    return torch.rand(b, 3, h, w) * 2 - 1


@pytest.mark.parametrize("quantizer,norm", [("vq", "group"), ("fsq", "group"), ("lfq", "group"), ("vq", "channel")])
def test_save_load_bit_exact_and_deterministic(tmp_path, quantizer, norm):
    model = tiny(quantizer, norm=norm)
    x = _images()
    model.train()
    for _ in range(2):  # a couple of training passes move the EMA codebook buffers
        model(x)
    model.eval()
    codes = model.encode(x)
    assert codes.shape == (3, 16 // 4, 24 // 4) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < model.codebook_size
    assert torch.equal(codes, model.encode(x))  # deterministic in eval mode
    recon = model.decode(codes)
    assert recon.shape == x.shape and float(recon.abs().max()) <= 1.0

    model.save_pretrained(tmp_path / "vq")
    cfg = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert cfg["model_type"] == "mmkit_vq" and cfg["quantizer"] == quantizer
    loaded = VQModel.from_pretrained(tmp_path / "vq")
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), recon)

    import mmkit  # the global loader dispatches on model_type

    assert torch.equal(mmkit.load_model(tmp_path / "vq").encode(x), codes)


def test_decode_of_codes_matches_forward_quantized_path():
    """decode(encode(x)) equals the training forward's reconstruction in eval mode."""
    model = tiny().eval()
    x = _images()
    with torch.no_grad():
        recon, codes, _ = model(x)
    assert torch.equal(codes, model.encode(x))
    torch.testing.assert_close(model.decode(codes), recon.clamp(-1, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantizer,cosine", [("vq", True), ("vq", False), ("fsq", True), ("lfq", True)])
def test_code_search_equals_the_library_forward(quantizer, cosine):
    """`Quantizer.codes` (encode's argmax without the library's one-hot) picks the library's codes:
    a 2048-code codebook moved by EMA, ~4600 latents, also under bf16 autocast."""
    model = tiny(quantizer, codebook_size=2048 if quantizer == "vq" else 16, embed_dim=8, use_cosine_sim=cosine)
    x = _images(b=8, h=96, w=96)
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        z = model.latents(x)
        ref = model.quantize(z)[1]
        assert torch.equal(model.quantize.codes(z), ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model.quantize.codes(z), ref)
    assert torch.equal(model.encode(x), ref)
    if quantizer == "vq":
        assert len(ref.unique()) > 100  # many near-equal candidates: a real test of the argmax


def test_vq_quantizer_settings_are_explicit():
    vq = tiny().quantize.impl
    assert vq.rotation_trick is False and vq.commitment_weight == 0.25
    assert vq._codebook.decay == 0.99 and vq._codebook.threshold_ema_dead_code == 2.0
    assert vq.ema_update and vq._codebook.use_cosine_sim and not vq.learnable_codebook


def test_bad_inputs_get_clear_errors():
    model = tiny().eval()
    with pytest.raises(UsageError, match="channels"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(UsageError, match="smaller than the VQ downsampling factor 4"):
        model.encode(torch.zeros(1, 3, 2, 16))
    with pytest.raises(UsageError, match="not divisible"):
        model.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(UsageError, match="shape"):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.raises(UsageError, match="out of range"):
        model.decode(torch.full((1, 2, 2), 16))
    with pytest.raises(UsageError, match="unknown VQ preset"):
        preset_config("nope")


def test_presets_have_the_documented_geometry():
    c = preset_config("f16-8192")
    assert c.downsample == 16 and c.codebook_size == 8192 and c.resolution // c.downsample == 32
    c = preset_config("f16-16384")
    assert c.downsample == 16 and c.codebook_size == 16384 and c.embed_dim == 8
    c = preset_config("shapes-f8")
    assert c.downsample == 8


def test_decoder_res_blocks_sets_decoder_depth_only(tmp_path):
    default, light = tiny(), tiny(decoder_res_blocks=1)
    assert [len(level.block) for level in default.decoder.up] == [2, 2, 2]  # taming: num_res_blocks + 1
    assert [len(level.block) for level in light.decoder.up] == [1, 1, 1]
    assert [len(level.block) for level in light.encoder.down] == [1, 1, 1]  # encoder untouched
    assert light.num_parameters() < default.num_parameters()
    x = _images()
    assert light.eval().decode(light.encode(x)).shape == x.shape
    light.save_pretrained(tmp_path)
    assert VQModel.from_pretrained(tmp_path).config.decoder_res_blocks == 1
    with pytest.raises(UsageError, match="decoder_res_blocks"):  # ConfigError: a one-line user error
        preset_config("shapes-f8", decoder_res_blocks=0)


def test_usage_and_perplexity_on_constructed_case():
    # 8 codes of a 16-entry codebook used; 4 used uniformly 3x, 4 used 1x
    codes = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 5, 6, 7]).view(1, 4, 4)
    hist = code_histogram(codes, 16)
    usage, ppl = usage_and_perplexity(hist)
    assert usage == 50.0
    p = torch.tensor([3 / 16] * 4 + [1 / 16] * 4, dtype=torch.float64)
    assert math.isclose(ppl, math.exp(float(-(p * p.log()).sum())), rel_tol=1e-12)
    usage, ppl = usage_and_perplexity(code_histogram(torch.arange(16), 16))
    assert usage == 100.0 and math.isclose(ppl, 16.0, rel_tol=1e-9)


def test_psnr_ssim_known_values():
    x = torch.rand(2, 3, 16, 16)
    y = (x + 0.1).clamp(0, 1)
    mse = (x - y).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(x, y), 10 * torch.log10(1 / mse))
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    assert bool((ssim(x, y) < 1).all()) and bool((ssim(x, torch.rand(2, 3, 16, 16)) < 0.2).all())


def test_ssim_equals_the_windowed_definition():
    """Wang et al. 2004 written out window by window (Gaussian-weighted moments, valid region)
    on non-square images: the banded-matmul blur keeps orientation, window and borders."""
    from mmkit.vq.metrics import _gaussian_window

    torch.manual_seed(0)
    x = torch.rand(2, 3, 13, 17)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    k = 11
    G = torch.outer(_gaussian_window(k), _gaussian_window(k))  # (k, k) fp64
    xd, yd = x.double(), y.double()
    ref = torch.zeros(2, dtype=torch.float64)
    n = 0
    for i in range(13 - k + 1):
        for j in range(17 - k + 1):
            a, b = xd[..., i:i + k, j:j + k], yd[..., i:i + k, j:j + k]  # (B, C, k, k)
            mx, my = (G * a).sum((-2, -1)), (G * b).sum((-2, -1))
            vx = (G * a * a).sum((-2, -1)) - mx**2
            vy = (G * b * b).sum((-2, -1)) - my**2
            cxy = (G * a * b).sum((-2, -1)) - mx * my
            s = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4))
            ref += s.mean(1)
            n += 1
    torch.testing.assert_close(ssim(x, y), (ref / n).float(), rtol=0, atol=1e-7)
    # images smaller than the window: the window shrinks to the largest odd side that fits
    small = torch.rand(1, 3, 6, 9)
    torch.testing.assert_close(ssim(small, small), torch.ones(1))


def test_quantizer_runs_fp32_under_bf16_autocast():
    """bf16 training: the nearest-code search must pick the codes fp32 encode picks."""
    torch.manual_seed(0)
    model = tiny(codebook_size=2048, embed_dim=8).eval()  # many close codes: bf16 search would differ
    z = torch.randn(4, 8, 8, 8)  # (B, D, h, w) quant_conv output
    zq32, codes32, _ = model.quantize(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zq, codes, _ = model.quantize(z)
        codes_again = model.quantize(z)[1]
    assert zq.dtype == torch.float32
    assert torch.equal(codes, codes32) and torch.equal(codes, codes_again)
    assert torch.equal(zq, zq32)
