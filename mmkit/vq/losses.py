"""Training losses for the VQ tokenizer, packaged with the model as one nn.Module.

`VQTrainer` holds the tokenizer, an optional PatchGAN discriminator and an optional frozen
perceptual network, and returns one scalar from `forward` so that the shared engine (one
optimizer, one backward) can train generator and discriminator together: the generator's
adversarial term sees the discriminator through detached parameters
(`torch.func.functional_call`), and the discriminator's hinge term sees detached
reconstructions, so each term's gradient reaches only its own side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmkit.errors import UsageError
from mmkit.vq.model import VQModel


@dataclass
class VQLossConfig:
    recon: Literal["l1", "l2", "l1+l2"] = "l1+l2"
    recon_weight: float = 1.0
    quantizer_weight: float = 1.0  # x the quantizer's own loss (commitment / entropy terms)
    perceptual_weights: str | None = None  # local torchvision VGG16 safetensors; None = off
    perceptual_weight: float = 1.0
    disc_weight: float = 0.0  # PatchGAN hinge loss weight; 0 = no discriminator
    disc_start: int = 0  # optimizer step at which the adversarial loss switches on
    disc_channels: int = 64
    disc_layers: int = 3
    # After the last step (before saving `final/`): k-means refit of the vq codebook on the
    # latents of this many training batches (0 = off; see Quantizer.refit_codebook).
    codebook_refit_batches: int = 0
    codebook_refit_iters: int = 10
    # Then: fine-tune decoder + post_quant_conv for this many steps on *full* training images
    # with their codes fixed (0 = off). The network was trained on crops and the codebook has
    # just moved; this adapts the decoder to both (see VQTask.finetune_decoder).
    decoder_finetune_steps: int = 0
    decoder_finetune_lr: float = 1e-3
    decoder_finetune_images: int = 1500  # training images held in memory for it
    decoder_finetune_batch: int = 8  # images of one size per step
    decoder_finetune_bf16: bool = True  # bf16 autocast, as train.mixed_precision: bf16 (false on CPUs without bf16)

    def __post_init__(self):
        if self.disc_weight < 0 or self.perceptual_weight < 0 or self.recon_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if self.codebook_refit_batches < 0 or self.codebook_refit_iters < 1:
            raise ValueError("codebook_refit_batches must be >= 0 and codebook_refit_iters >= 1")
        if self.decoder_finetune_steps < 0 or self.decoder_finetune_images < 1 or self.decoder_finetune_batch < 1:
            raise ValueError("decoder_finetune_steps must be >= 0, decoder_finetune_images/batch >= 1")


def reconstruction_loss(diff: torch.Tensor, recon: str) -> torch.Tensor:
    """Mean L1 and/or L2 of `diff` (reconstruction - target), as `VQLossConfig.recon` names them."""
    rec = diff.new_zeros(())
    if "l1" in recon:
        rec = rec + diff.abs().mean()
    if "l2" in recon:
        rec = rec + diff.pow(2).mean()
    return rec


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming NLayerDiscriminator) with GroupNorm instead of BatchNorm
    (BatchNorm running stats would not survive the detached-parameter generator pass)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, n_layers + 1):
            cout = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, cout, 4, stride, 1, bias=False), nn.GroupNorm(min(32, cout // 4), cout), nn.LeakyReLU(0.2)]
            c = cout
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, 3, H, W) -> patch logits (B, 1, h', w')
        return self.net(x)


class VGGPerceptual(nn.Module):
    """LPIPS-style distance on frozen VGG16 features (unit-normalised, uniform layer weights).

    Weights come only from a local file the user names (torchvision `vgg16` state dict,
    `features.N.*` or `N.*` keys, safetensors); nothing is downloaded.
    """

    LAYERS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self, weights_path: str):
        super().__init__()
        from pathlib import Path

        import torchvision
        from safetensors.torch import load_file

        if not Path(weights_path).is_file():
            raise UsageError(f"perceptual_weights: no such file: {weights_path}")
        state = load_file(weights_path)
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        self.features = torchvision.models.vgg16(weights=None).features[: self.LAYERS[-1] + 1]
        missing, _ = self.features.load_state_dict(state, strict=False)
        if missing:
            raise UsageError(f"perceptual_weights {weights_path}: not a VGG16 state dict (missing {missing[:2]})")
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # always frozen
        return self

    def forward(self, x, y):  # images in [-1, 1] -> scalar
        h = torch.cat([x, y]).add(1).div(2).sub(self.mean).div(self.std)
        loss = h.new_zeros(())
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.LAYERS:
                a, b = h.chunk(2)
                a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
                b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
                loss = loss + (a - b).pow(2).sum(1).mean()
        return loss


class VQTrainer(nn.Module):
    """Tokenizer + training-only parts. `forward(images) -> (loss, metrics)`."""

    def __init__(self, vq: VQModel, loss_cfg: VQLossConfig):
        super().__init__()
        self.vq = vq
        self.loss_cfg = loss_cfg
        self.disc = (
            PatchDiscriminator(vq.config.in_channels, loss_cfg.disc_channels, loss_cfg.disc_layers)
            if loss_cfg.disc_weight > 0 else None
        )
        self.perceptual = VGGPerceptual(loss_cfg.perceptual_weights) if loss_cfg.perceptual_weights else None
        # optimizer steps taken (saved with checkpoints, so disc_start survives a resume)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, images):  # (B, 3, H, W) in [-1, 1]
        cfg = self.loss_cfg
        recon, codes, q_loss = self.vq(images)
        diff = recon - images
        rec = reconstruction_loss(diff, cfg.recon)
        loss = cfg.recon_weight * rec + cfg.quantizer_weight * q_loss
        metrics = {"recon": float(rec.detach()), "quant": float(q_loss.detach()),
                   "mse": float(diff.detach().pow(2).mean())}
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            p = self.perceptual(recon, images)
            loss = loss + cfg.perceptual_weight * p
            metrics["perceptual"] = float(p.detach())
        if self.disc is not None and int(self.step) >= cfg.disc_start:
            frozen = {n: p.detach() for n, p in self.disc.named_parameters()}
            g_adv = -torch.func.functional_call(self.disc, frozen, (recon,)).mean()  # hinge generator loss
            d_real = self.disc(images)
            d_fake = self.disc(recon.detach())
            d_loss = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
            loss = loss + cfg.disc_weight * g_adv + d_loss
            metrics.update(g_adv=float(g_adv.detach()), d_loss=float(d_loss.detach()))
        return loss, codes, metrics
