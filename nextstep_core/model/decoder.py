"""The NextStep AR model: a Qwen2.5-style decoder, the image projectors and the flow-matching head.

Parameter names are the published checkpoint keys (no `model.` prefix): `embed_tokens`, `layers.{i}.self_attn.*`,
`layers.{i}.mlp.*`, `norm`, `lm_head`, `image_in_projector`, `image_out_projector`, `image_head.net.*` and the
optional `gen_pos_embed` buffer. Layer classes come from `operations` (default `torch.nn`) so that a host such as
ComfyUI can hand in its own memory-managed Linear/Embedding.

One forward for everything, as gpt-fast has it: `forward(x, pos, mask, length)` runs x [B, S, H] at cache slots
`pos` [S]; each attention layer writes its own KV cache (`setup_caches`) and reads its first `length` slots under
`mask` (`attention.py`). Positions follow the reference exactly: the position of a token is its slot index, left
padding included; padding only ever shows up in the mask.

Per-token speed is mostly the number of kernels a decode step launches, so after loading `fuse_projections()`
merges q/k/v and gate/up into one matmul each (`merge.py`: the published keys are what the files keep; the merged
layers are built once, of the same layer class, quantised ones before they are packed); RMSNorm is `F.rms_norm`,
RoPE reads a cos/sin table and rotates q and k together in three ops, and a single query token attends to grouped
K/V heads natively (`attention.attention`).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, use_backends
from .head import FlowMatchingHead
from .kv_cache import KVCache
from .merge import PublishedKeys

if TYPE_CHECKING:
    from ..weights.config import ModelConfig

_HAS_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back to the input dtype, then times the weight (as the reference).

    `F.rms_norm` computes exactly that (float32 statistics, cast, then the weight in the input dtype) in one call,
    which is one fused kernel on GPUs; `reference()` is the reference's formula, kept for older torch and tests."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _HAS_RMS_NORM:
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * xf.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin for the given absolute positions [S], computed in float32 then cast (as the reference)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference's rotate-half RoPE (x [.., S, D] against cos/sin [S, D]): what `rope` is tested against."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_table(length: int, head_dim: int, theta: float, dtype: torch.dtype, device) -> torch.Tensor:
    """[length, 2, D]: cos, and sin with its first half negated, of positions 0..length-1 (`rope` reads it)."""
    cos, sin = rope_cos_sin(torch.arange(length, device=device), head_dim, theta, dtype)
    half = head_dim // 2
    return torch.stack([cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)], dim=1)


def rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """RoPE of x [B, S, H, D] with `table` rows [S, 2, D] in three ops: x cos + swap_halves(x) (±sin).

    rotate_half(x) sin = swap_halves(x) * (-sin_lo, sin_hi), so the sign lives in the table, not in a kernel."""
    cos, sin_signed = table[None, :, None, 0], table[None, :, None, 1]
    b, s, h, d = x.shape
    swapped = x.view(b, s, h, 2, d // 2).flip(-2).view(b, s, h, d)
    return torch.addcmul(x * cos, swapped, sin_signed)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops, backend: str = "sdpa"):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.backend = backend
        h = cfg.hidden_size
        self.q_proj = ops.Linear(h, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = ops.Linear(h, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = ops.Linear(h, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = ops.Linear(self.n_heads * self.head_dim, h, bias=cfg.o_attention_bias)
        self.register_module("qkv_proj", None)  # q, k and v as one layer, once `fuse` has run
        self.published = PublishedKeys(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"))
        self.kv_cache: KVCache | None = None  # set by NextStep.setup_caches; a plain object, not a buffer

    def fuse(self) -> bool:
        return self.published.fuse()

    def forward(self, x, rope_rows, pos: torch.Tensor, mask, length: int):
        b, s, _ = x.shape
        hq, hkv, d = self.n_heads, self.n_kv, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
            qk = rope(qkv[..., :(hq + hkv) * d].view(b, s, hq + hkv, d), rope_rows)  # q and k rotated together
            q, k = qk[:, :, :hq], qk[:, :, hq:]
            v = qkv[..., (hq + hkv) * d:].view(b, s, hkv, d)
        else:
            q = rope(self.q_proj(x).view(b, s, hq, d), rope_rows)
            k = rope(self.k_proj(x).view(b, s, hkv, d), rope_rows)
            v = self.v_proj(x).view(b, s, hkv, d)
        k, v = self.kv_cache.update(pos, k.transpose(1, 2), v.transpose(1, 2))
        out = attention(q.transpose(1, 2).contiguous(), k[:, :, :length], v[:, :, :length], mask, self.backend)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = ops.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = ops.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = ops.Linear(i, h, bias=cfg.mlp_bias)
        self.register_module("gate_up_proj", None)  # gate and up as one layer, once `fuse` has run
        self.published = PublishedKeys(self, "gate_up_proj", ("gate_proj", "up_proj"))

    def fuse(self) -> bool:
        return self.published.fuse()

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops, backend: str):
        super().__init__()
        self.self_attn = Attention(cfg, ops, backend)
        self.mlp = MLP(cfg, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope_rows, pos, mask, length):
        x = x + self.self_attn(self.input_layernorm(x), rope_rows, pos, mask, length)
        return x + self.mlp(self.post_attention_layernorm(x))


def sincos_2d_table(dim: int, grid: int) -> torch.Tensor:
    """MAE-style 2D sin-cos table [grid*grid, dim]: first half encodes the column, second half the row."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1).double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], dim=1).float()


@functools.lru_cache(maxsize=None)
def host_pinned(base: type) -> type:
    """`base` (an Embedding class, the host's own included) whose weights follow dtype casts but never leave the host:
    moves of the whole model and a host's per-module moves (ComfyUI loads module by module) alike. What a move's
    `fn` does is read off a one-element probe tensor."""

    class HostPinned(base):
        def _apply(self, fn, recurse=True):
            w = next((t for t in self.parameters(recurse=False) if t.is_floating_point()), None)
            if w is None or w.device.type == "meta":  # built on meta: materialised wherever the loader puts it
                return super()._apply(fn, recurse)
            target = fn(torch.zeros(1, dtype=w.dtype)).dtype
            return super()._apply(lambda t: t.to(target) if t.is_floating_point() else t, recurse)

    HostPinned.__name__ = f"HostPinned{base.__name__}"
    return HostPinned


class NextStep(nn.Module):
    # Kept on the host whatever device the model moves to: the token-embedding table (1.56 GB at the real size) is
    # read once per generation, for the prompt, and only the embedded prompt goes to the device.
    HOST_MODULES = ("embed_tokens",)

    def __init__(self, cfg: ModelConfig, operations=None, attn_backend: str = "sdpa", with_lm_head: bool = False):
        super().__init__()
        ops = operations or nn  # a host (ComfyUI) may hand in its own Linear / Embedding / LayerNorm classes
        self.config = cfg
        self.attn_backend = attn_backend
        self.embed_tokens = host_pinned(ops.Embedding)(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, attn_backend) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ops.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if with_lm_head else None
        self.image_in_projector = ops.Linear(cfg.token_dim, cfg.hidden_size)
        self.image_out_projector = ops.Linear(cfg.hidden_size, cfg.hidden_size)
        self.image_head = FlowMatchingHead(cfg.token_dim, cfg.hidden_size, cfg.fm_head_dim, cfg.fm_head_layers,
                                           cfg.fm_head_mlp_ratio, ops)
        if cfg.use_gen_pos_embed:
            g = cfg.base_image_grid_size
            self.register_buffer("gen_pos_embed", sincos_2d_table(cfg.hidden_size, g)[None], persistent=True)
        else:
            self.gen_pos_embed = None
        # what the loader knows about the checkpoint (`loading.load_model` fills them in)
        self.tokenizer = None
        self.latent_affine: tuple[float, float] = (1.0, 0.0)  # (scale, shift): AR latents -> raw VAE latents
        self.source_path = ""
        self.unexpected_keys: list[str] = []
        self.quant: str | None = None  # weight format when quantised: "fp8", "int8", ...
        self.step_cache = None  # the fixed-shape per-token step, kept between calls (generation/graph.py)
        self.broken_steps: dict = {}  # keys whose fixed step was found wrong, and why (generation/graph.py)
        self._rope: torch.Tensor | None = None  # `rope_table` rows, grown on demand

    def fuse_projections(self) -> int:
        """Merge q/k/v and gate/up into one matmul each (`merge.py`; quantised ones before their kernel is chosen);
        returns how many merged."""
        return sum(int(layer.self_attn.fuse()) + int(layer.mlp.fuse()) for layer in self.layers)

    def release_step_cache(self) -> None:
        """Free the kept fixed-shape step (its CUDA graphs, static buffers and KV caches)."""
        self.step_cache = None
        self.install_caches(None)

    def rope_rows(self, length: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The RoPE table for positions 0..length-1 at least (built in float32 and cast, as `rope_cos_sin`)."""
        t = self._rope
        if t is None or t.shape[0] < length or t.dtype != dtype or t.device != torch.device(device):
            if t is not None:
                self.step_cache = None  # a kept CUDA graph reads the old table
            n = max(length, 4096 if t is None else 2 * t.shape[0])
            self._rope = t = rope_table(n, self.config.head_dim, self.config.rope_theta, dtype, device)
        return t

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype. Norm weights are never quantised, so they carry it."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def setup_caches(self, batch: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        """Give every attention layer an empty KV cache of `max_len` slots for `batch` rows; returns them."""
        cfg = self.config
        caches = [KVCache(batch, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype or self.dtype,
                          device or self.device) for _ in self.layers]
        self.install_caches(caches)
        return caches

    def install_caches(self, caches: list[KVCache] | None) -> None:
        """Hand each layer its cache again (a kept fixed-shape step's), or none (frees the memory after a call)."""
        for i, layer in enumerate(self.layers):
            layer.self_attn.kv_cache = None if caches is None else caches[i]

    @property
    def group(self) -> int:
        """Query heads per K/V head: a single query token attends as this many rows per K/V head."""
        return self.config.num_attention_heads // self.config.num_key_value_heads

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, length: int) -> torch.Tensor:
        """x [B, S, H] at cache slots `pos` [S] (a device tensor); attention reads the first `length` slots of every
        layer's cache under `mask` (`attention.prefill_mask` / `decode_mask`; None: all of them). Returns the
        final-normed hidden states [B, S, H]."""
        table = self.rope_rows(length, x.dtype, x.device).index_select(0, pos)
        with use_backends(x.device, x.dtype, self.config.head_dim):
            for layer in self.layers:
                x = layer(x, table, pos, mask, length)
        return self.norm(x)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Prompt ids [B, S] -> embeddings [B, S, H] on the model's device (the table stays on the host)."""
        table = self.embed_tokens.weight
        return self.embed_tokens(ids.to(table.device)).to(self.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise RuntimeError("This model was loaded without its LM head; load it with load_lm_head=True.")
        return self.lm_head(hidden.to(self.lm_head.weight.device))  # a head tied to the table is on the host

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

