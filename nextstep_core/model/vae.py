"""The f8ch16 image tokenizer: a FLUX autoencoder (BFL key names) with NextStep's latent normalisation.

Keys: `encoder.{conv_in, down.{i}.block.{j}, down.{i}.downsample.conv, mid.{block_1,attn_1,block_2}, norm_out,
conv_out}` and `decoder.{conv_in, mid.*, up.{i}.block.{j}, up.{i}.upsample.conv, norm_out, conv_out}`; no quant convs.

Three spaces meet here:
- pixels in [0, 1] (the API) ↔ [-1, 1] (the network);
- raw VAE latents z [B,16,H/8,W/8]: what the decoder consumes and what ComfyUI's LATENT carries;
- AR latents (z - shift) * scale, which patchify into the model's tokens.
Encoding returns the posterior mean (the published tokenizer is deterministic), normalised per psz×psz group of
latent pixels (the 64 values of one AR token when psz = 2) when the config says `encoder_norm`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..weights.config import VAEConfig



def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, ops):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), ops.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), ops.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = ops.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head attention over all latent pixels."""

    def __init__(self, ch: int, ops):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v = ops.Conv2d(ch, ch, 1), ops.Conv2d(ch, ch, 1), ops.Conv2d(ch, ch, 1)
        self.proj_out = ops.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int, ops):
        super().__init__()
        self.conv = ops.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int, ops):
        super().__init__()
        self.conv = ops.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int, ops):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch, ops), AttnBlock(ch, ops), ResnetBlock(ch, ch, ops)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = ops.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * m, ops))
                cin = ch * m
            if i != len(mult) - 1:
                level.downsample = Downsample(cin, ops)
            self.down.append(level)
        self.mid = _Mid(cin, ops)
        self.norm_out = _norm(cin)
        self.conv_out = ops.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        cin = ch * mult[-1]
        self.conv_in = ops.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin, ops)
        levels = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, ch * mult[i], ops))
                cin = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(cin, ops)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # index = resolution level, run from the last to the first
        self.norm_out = _norm(cin)
        self.conv_out = ops.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def group_layer_norm(z: torch.Tensor, psz: int, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance over each psz×psz block of latent pixels, all channels together."""
    b, c, h, w = z.shape
    g = z.reshape(b, c, h // psz, psz, w // psz, psz).permute(0, 2, 4, 1, 3, 5).reshape(b, h // psz, w // psz, -1)
    g = F.layer_norm(g, (g.shape[-1],), eps=eps)
    return g.reshape(b, h // psz, w // psz, c, psz, psz).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class AutoEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig, operations=None):
        super().__init__()
        ops = operations or nn  # a host (ComfyUI) may hand in its own layer classes
        self.config = cfg
        self.encoder = Encoder(cfg, ops)
        self.decoder = Decoder(cfg, ops)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def encode_mean(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,H,W] in [0,1] -> raw latents z [B,16,H/8,W/8] (posterior mean, normalised if configured)."""
        x = (pixels.to(self.device, self.dtype) - 0.5) / 0.5
        mean, _logvar = self.encoder(x).chunk(2, dim=1)
        if self.config.encoder_norm:
            mean = group_layer_norm(mean, self.config.psz or 1)
        return mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents z -> pixels [B,3,H,W] in [0,1] (float32)."""
        x = self.decoder(z.to(self.device, self.dtype)).float()
        return (x / 2 + 0.5).clamp(0, 1)

    def to_ar(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_ar(self, z_ar: torch.Tensor) -> torch.Tensor:
        return z_ar / self.config.scaling_factor + self.config.shift_factor
