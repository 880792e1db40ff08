"""The flow-matching head: an AdaLN residual MLP that predicts the velocity (data - noise) of one image token.

Keys under `image_head.net.`: `time_embed.mlp.{0,2}`, `cond_embed`, `input_proj`, `res_blocks.{j}.{in_ln,mlp.{0,2},
adaLN_modulation.1}`, `final_layer.{linear,adaLN_modulation.1}`. t runs from 0 (noise) to 1 (data) and enters the
sinusoid unscaled, cosine half first.

Every AdaLN input is `time_embed(t) + cond_embed(c)`, and both are known before the first sampling step: the
time grid is fixed and `c` is fixed per token. `modulations()` therefore computes the shift/scale/gate vectors of
all steps in one matmul per block, so the AdaLN weights (most of the head's bytes) are read once per token instead
of once per step; `velocity_premod()` then runs one step with them. `forward()` is the plain per-step form.

`velocity_fused()` is the same step in fewer kernels (what a GPU pays for per step): the scale vectors come in as
`1 + scale` (`modulations(..., plus_one=True)`), so modulation and gate + residual are one `addcmul` each, and the
input projection runs once for all guidance rows (they share x) and is broadcast over them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FREQ_DIM = 256


def timestep_sinusoid(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, ops):
        super().__init__()
        self.mlp = nn.Sequential(ops.Linear(FREQ_DIM, dim), nn.SiLU(), ops.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t).to(t.dtype))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, ops):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.in_ln = ops.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(ops.Linear(dim, hidden), nn.SiLU(), ops.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(dim, 3 * dim))

    def forward(self, x, y):
        return self.apply_mod(x, self.adaLN_modulation(y))

    def apply_mod(self, x, mod):
        shift, scale, gate = mod.chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, ops):
        super().__init__()
        self.norm_final = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = ops.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(dim, 2 * dim))

    def forward(self, x, y):
        return self.apply_mod(x, self.adaLN_modulation(y))

    def apply_mod(self, x, mod):
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, in_dim: int, cond_dim: int, dim: int, layers: int, mlp_ratio: float, ops):
        super().__init__()
        self.time_embed = TimestepEmbedder(dim, ops)
        self.cond_embed = ops.Linear(cond_dim, dim)
        self.input_proj = ops.Linear(in_dim, dim)
        self.res_blocks = nn.ModuleList(ResBlock(dim, mlp_ratio, ops) for _ in range(layers))
        self.final_layer = FinalLayer(dim, in_dim, ops)

    def forward(self, x, t, c):
        y = self.time_embed(t) + self.cond_embed(c)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class FlowMatchingHead(nn.Module):
    def __init__(self, in_dim, cond_dim, dim, layers, mlp_ratio, ops):
        super().__init__()
        self.net = SimpleMLPAdaLN(in_dim, cond_dim, dim, layers, mlp_ratio, ops)

    @property
    def dtype(self) -> torch.dtype:
        return self.net.res_blocks[0].in_ln.weight.dtype if self.net.res_blocks else torch.float32

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """v(x, t | c) for rows x [R,D] (fp32 in and out; the net runs in the model dtype, t cast to it too)."""
        dtype = c.dtype
        t = torch.as_tensor(t, dtype=torch.float32, device=c.device).expand(x.shape[0]).to(dtype)
        return self.net(x.to(dtype), t, c).float()

    def time_embeddings(self, t_grid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """time_embed of a whole time grid [N] -> [N, dim]: fixed for a generation, so callers compute it once."""
        return self.net.time_embed(t_grid.to(dtype))

    def modulations(self, t_grid: torch.Tensor, c: torch.Tensor, temb: torch.Tensor | None = None,
                    plus_one: bool = False) -> list[torch.Tensor]:
        """AdaLN vectors for every (step, row): one [N, R, k*dim] tensor per block, final layer last.

        `temb`: `time_embeddings(t_grid)` when the caller keeps it (it is the same for every token). `plus_one`:
        the scale part holds `1 + scale` (what `velocity_fused` takes), rounded as the plain form rounds it."""
        net = self.net
        dtype = c.dtype
        if temb is None:
            temb = self.time_embeddings(t_grid, dtype)  # [N, dim]: the same for every row
        cemb = net.cond_embed(c)  # [R, dim]: the same for every step
        y = F.silu(temb[:, None, :] + cemb[None, :, :])  # [N, R, dim]
        mods = [blk.adaLN_modulation[1](y) for blk in net.res_blocks]
        mods.append(net.final_layer.adaLN_modulation[1](y))
        if plus_one:
            dim = cemb.shape[-1]
            for m in mods:
                m[..., dim:2 * dim].add_(1)
        return mods

    def velocity_premod(self, x: torch.Tensor, mods: list[torch.Tensor], step: int) -> torch.Tensor:
        net = self.net
        h = net.input_proj(x.to(mods[0].dtype))
        for blk, mod in zip(net.res_blocks, mods):
            h = blk.apply_mod(h, mod[step])
        return net.final_layer.apply_mod(h, mods[-1][step]).float()

    def velocity_fused(self, x: torch.Tensor, mods: list[torch.Tensor], step: int, rows: int) -> torch.Tensor:
        """`velocity_premod` for `rows` guidance rows that share x [B, D]; mods from `modulations(plus_one=True)`.

        Returns [rows, B, D] float32. Per block: layer norm, one addcmul for the modulation, the MLP, one addcmul for
        gate + residual; the first block's norm runs on the shared [1, B, dim] input and broadcasts over the rows.
        """
        net = self.net
        b = x.shape[0]
        h = net.input_proj(x.to(mods[0].dtype))[None]  # [1, B, dim]
        for blk, mod in zip(net.res_blocks, mods):
            shift, scale1, gate = mod[step].view(rows, b, -1).chunk(3, dim=-1)
            h = torch.addcmul(h, gate, blk.mlp(torch.addcmul(shift, blk.in_ln(h), scale1)))
        shift, scale1 = mods[-1][step].view(rows, b, -1).chunk(2, dim=-1)
        final = net.final_layer
        return final.linear(torch.addcmul(shift, final.norm_final(h), scale1)).float()
