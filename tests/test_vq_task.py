"""The "vq" training task: crops, loss through the task interface, GAN gradient routing."""

import random

import pytest
import torch

from mmkit.errors import ConfigError, UsageError
from mmkit.train.task import get_task
from mmkit.vq.task import CropImages, collate_crops

TINY_MODEL = dict(base_channels=8, channel_multiplier=[1, 2, 2], latent_channels=8, embed_dim=4,
                  codebook_size=16, norm_groups=4, mid_attn=False)


def _docs(n=6):
    from mmkit.data import shapes

    rng = random.Random(0)
    return [{"__key__": f"s{i}", "kind": "caption", "texts": ["x", None],
             "images": [None, shapes.render(shapes.random_scene(rng, sides=(24, 32)))]} for i in range(n)]


def test_crops_are_deterministic_and_sized():
    crop = CropImages(crop=16, flip=True, seed=0, max_images=4)
    docs = _docs()
    a = collate_crops([crop(d) for d in docs])["images"]
    b = collate_crops([crop(d) for d in docs])["images"]
    assert a.shape == (6, 3, 16, 16) and torch.equal(a, b)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    small = {"__key__": "k", "images": [docs[0]["images"][1].resize((8, 8))]}
    assert crop(small).shape == (1, 3, 16, 16)  # smaller images are edge-padded
    assert crop({"__key__": "k", "images": [None]}) is None
    # a later epoch (when the reader passes it) draws other crops, again deterministically
    e1 = [crop({**d, "__epoch__": 1}) for d in docs]
    assert all(torch.equal(x, y) for x, y in zip(e1, [crop({**d, "__epoch__": 1}) for d in docs]))
    assert not all(torch.equal(x, y[0:1]) for x, y in zip(e1, a.split(1)))


def test_task_config_is_strict():
    cls = get_task("vq")
    with pytest.raises(ConfigError, match="codebok_size"):
        cls({"codebok_size": 3}, {}, seed=0, out_dir=".")
    with pytest.raises(ConfigError, match="loss.disc_wieght"):
        cls({"loss": {"disc_wieght": 1}}, {}, seed=0, out_dir=".")
    with pytest.raises(UsageError, match="multiple of the downsampling"):
        cls({}, {"crop": 12}, seed=0, out_dir=".")
    t = cls({"preset": "f16-8192", "codebook_size": 1024}, {}, seed=0, out_dir=".")
    assert t.vq_cfg.codebook_size == 1024 and t.vq_cfg.downsample == 16


def test_training_smoke_loss_falls(tmp_path):
    task = get_task("vq")({**TINY_MODEL, "loss": {"disc_weight": 0.1, "disc_start": 10, "disc_channels": 8,
                                                  "disc_layers": 2}},
                          {"crop": 16}, seed=0, out_dir=str(tmp_path))
    model = task.build_model()
    batch = collate_crops([CropImages(16, False, 0, 4)(d) for d in _docs(8)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss, metrics = task.loss(model, batch)
        assert metrics["tokens"] == 8 * 4 * 4 and ("d_loss" in metrics) == (step >= 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.on_optimizer_step(model)
        losses.append(metrics["recon"])
    assert int(model.step) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    task.save_final(model, str(tmp_path / "final"))
    from mmkit.vq.model import VQModel

    vq = VQModel.from_pretrained(tmp_path / "final")
    assert torch.equal(vq.encode(batch["images"]), model.vq.eval().encode(batch["images"]))


def test_adversarial_terms_reach_only_their_side():
    """One backward of the summed loss == generator grads from G terms, disc grads from the hinge D loss."""
    import torch.nn.functional as F

    task = get_task("vq")({**TINY_MODEL, "loss": {"disc_weight": 0.5, "disc_channels": 8, "disc_layers": 2}},
                          {"crop": 16}, seed=0, out_dir=".")
    model = task.build_model().eval()  # eval: no EMA update, the forward is repeatable
    x = collate_crops([CropImages(16, False, 0, 4)(d) for d in _docs(4)])["images"]
    loss, _, _ = model(x)
    loss.backward()
    d_grad = {n: p.grad.clone() for n, p in model.disc.named_parameters()}
    model.zero_grad()
    recon, _, _ = model.vq(x)
    d_loss = 0.5 * (F.relu(1 - model.disc(x)).mean() + F.relu(1 + model.disc(recon.detach())).mean())
    d_loss.backward()
    for n, p in model.disc.named_parameters():
        torch.testing.assert_close(d_grad[n], p.grad, msg=n)
    # the generator does get an adversarial gradient
    model.zero_grad()
    (-model.disc(model.vq(x)[0]).mean()).backward()
    assert model.vq.decoder.conv_out.weight.grad.abs().sum() > 0


def test_perceptual_loss_only_from_local_weights(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    from mmkit.vq.losses import VGGPerceptual

    with pytest.raises(UsageError, match="no such file"):
        get_task("vq")({**TINY_MODEL, "loss": {"perceptual_weights": str(tmp_path / "vgg.safetensors")}},
                       {"crop": 16}, seed=0, out_dir=".").build_model()
    torch.manual_seed(0)
    feats = torchvision.models.vgg16(weights=None).features
    save_file({f"features.{k}": v.contiguous() for k, v in feats.state_dict().items()}, str(tmp_path / "vgg.safetensors"))
    p = VGGPerceptual(str(tmp_path / "vgg.safetensors"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(p(x, x)) == 0.0 and float(p(x, x.flip(-1))) > 0
    assert not any(q.requires_grad for q in p.parameters())
    model = get_task("vq")({**TINY_MODEL, "loss": {"perceptual_weights": str(tmp_path / "vgg.safetensors")}},
                           {"crop": 16}, seed=0, out_dir=".").build_model()
    loss, _, metrics = model(x)
    assert metrics["perceptual"] > 0 and torch.isfinite(loss)


def test_codebook_refit_lowers_quantization_error():
    """Lloyd refit: on clustered latents the error falls, codes stay valid, encode/decode stay consistent."""
    from mmkit.vq.model import VQModel, preset_config

    torch.manual_seed(0)
    vq = VQModel(preset_config("shapes-f8", **TINY_MODEL)).eval()
    centres = torch.nn.functional.normalize(torch.randn(16, 4), dim=-1)
    z = centres[torch.randint(0, 16, (2000,))] + 0.05 * torch.randn(2000, 4)  # (N, D)
    stats = vq.quantize.refit_codebook(z, iters=5)
    assert stats["qerr_after"] < 0.5 * stats["qerr_before"]
    E = vq.quantize.impl._codebook.embed[0]
    torch.testing.assert_close(E.norm(dim=-1), torch.ones(16))  # cosine codebook stays on the sphere
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        recon, codes, _ = vq(x)
    torch.testing.assert_close(vq.decode(codes), recon.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    fsq = VQModel(preset_config("shapes-f8", **{**TINY_MODEL, "quantizer": "fsq", "fsq_levels": [4, 4]}))
    with pytest.raises(UsageError, match="quantizer 'vq'"):
        fsq.quantize.refit_codebook(z)


def test_save_final_refits_codebook_when_asked(tmp_path, monkeypatch):
    task = get_task("vq")({**TINY_MODEL, "loss": {"codebook_refit_batches": 2, "codebook_refit_iters": 3}},
                          {"crop": 16, "sources": "unused"}, seed=0, out_dir=str(tmp_path))
    batch = collate_crops([CropImages(16, False, 0, 4)(d) for d in _docs(8)])
    monkeypatch.setattr(task, "batches", lambda **kw: iter([batch, batch]))
    model = task.build_model()
    before = model.vq.quantize.impl._codebook.embed.clone()
    task.save_final(model, str(tmp_path / "final"))
    from mmkit.vq.model import VQModel

    saved = VQModel.from_pretrained(tmp_path / "final").quantize.impl._codebook.embed
    assert not torch.equal(saved, before) and torch.equal(saved, model.vq.quantize.impl._codebook.embed)
    assert model.vq.training  # mode restored


def test_decoder_finetune_trains_only_the_decoder(tmp_path, monkeypatch):
    """save_final's decoder fine-tune: decoder + post_quant_conv move and fit better; encoder,
    quant_conv and the codebook (so every code) stay exactly as trained."""
    import mmkit.vq.evaluate as vq_eval
    from mmkit.vq.task import image_to_tensor

    images = [image_to_tensor(d["images"][1]) for d in _docs(8)]  # (3, H, W) full images, two sizes
    monkeypatch.setattr(vq_eval, "iter_shard_images", lambda sources, limit=None, square=None: iter(images[:limit]))
    task = get_task("vq")({**TINY_MODEL, "loss": {"decoder_finetune_steps": 30, "decoder_finetune_lr": 3e-3,
                                                  "decoder_finetune_bf16": False}},
                          {"crop": 16, "sources": "unused"}, seed=0, out_dir=str(tmp_path))
    model = task.build_model()
    vq = model.vq.eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    batch = torch.stack([x for x in images if x.shape == images[0].shape])
    codes = vq.encode(batch)
    stats = task.finetune_decoder(vq)
    assert stats["last_loss"] < stats["first_loss"]
    after = vq.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
    assert torch.equal(vq.encode(batch), codes)
    assert all(p.requires_grad for p in vq.parameters())  # trainability restored
