"""Weight-only quantisation: fp8 (e4m3fn) or int8 weights with one float32 scale per output channel.

Weights stay quantised in memory, so a model takes about half the memory of its bf16 form. On GPUs with fp8 tensor
cores (compute capability 8.9+) fp8 layers multiply in fp8 directly (`NEXTSTEP_FP8_MATMUL=0` turns that off);
elsewhere, and for int8, each layer's weight is expanded to the compute dtype inside `forward` (the head's, once per
token: `expanded_weights`). Which layers are quantised is decided when a file is written (`should_quantize`): the
decoder's projections and the head's residual blocks — the bulk of the bytes — while the embeddings, the image
projectors and the head's input, condition, time and output layers stay in high precision, where a small error
would reach every token.
"""
from __future__ import annotations

import os
import re
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

QUANT_FORMATS = ("fp8", "int8")
QUANT_SUFFIXES = (".weight_scale",)
_FP8_MAX = 448.0
_QUANTIZED_KEYS = re.compile(
    r"^(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    r"|image_head\.net\.res_blocks\.\d+\.(mlp\.[02]|adaLN_modulation\.1))\.weight$")


def should_quantize(key: str) -> bool:
    return bool(_QUANTIZED_KEYS.match(key))


def quantize_weight(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (quantised weight, float32 scale [out])."""
    w = w.float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    if fmt == "fp8":
        scale = amax / _FP8_MAX
        return (w / scale[:, None]).to(torch.float8_e4m3fn), scale
    if fmt == "int8":
        scale = amax / 127.0
        return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale
    raise ValueError(f"unknown quantisation {fmt!r}; use one of {QUANT_FORMATS}")


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if q.dtype == torch.float8_e4m3fn and q.device.type == "cpu":
        # CPU casts fp8 element by element (about 0.5 G/s); a 256-entry table lookup is exact and 2-3x faster
        table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(dtype)
        codes = q.view(torch.uint8)
        w = torch.empty(q.shape, dtype=dtype)
        rows = max(1, (1 << 20) // max(1, q.shape[-1]))  # bounded index temporaries (8 bytes per element)
        for i in range(0, q.shape[0], rows):
            w[i:i + rows] = torch.take(table, codes[i:i + rows].long())
    else:
        w = q.to(dtype)  # one temporary, scaled in place
    return w.mul_(scale[:, None].to(dtype))


_FP8_MATMUL = {"enabled": os.environ.get("NEXTSTEP_FP8_MATMUL", "1") != "0"}


def fp8_matmul_supported(device: torch.device) -> bool:
    """Hardware fp8 matmuls (Ada / Hopper and newer) through torch._scaled_mm."""
    return (_FP8_MATMUL["enabled"] and device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias) -> torch.Tensor:
    """x @ w.T with fp8 inputs: activations quantised per row (scale = amax / 448), weights per output channel.

    Reads each weight byte once, which is what makes fp8 faster than bf16 for token-by-token decoding; the
    dequantising path reads it, writes it in bf16 and reads it again.
    """
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    pad = -m % 16  # the fp8 kernels want row counts in multiples of 16
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    a_scale = (x2.abs().amax(dim=1, keepdim=True).float() / _FP8_MAX).clamp(min=1e-12)
    xq = (x2.float() / a_scale).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(xq, w.t(), scale_a=a_scale, scale_b=w_scale[None, :].float(), out_dtype=x.dtype)
    out = out[:m].reshape(*x.shape[:-1], w.shape[0])
    return out if bias is None else out + bias.to(out.dtype)


def make_quant_linear(base: type) -> type:
    """A Linear (subclass of the host's Linear class) that also accepts a quantised weight + `weight_scale`."""

    class QuantLinear(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("weight_scale", None)

        expanded = None  # set by `expanded_weights` while a block of calls reuses one dequantised copy

        def forward(self, x):
            if self.weight_scale is None:
                return super().forward(x)
            if self.expanded is not None:
                return F.linear(x, self.expanded, None if self.bias is None else self.bias.to(x.dtype))
            if self.weight.dtype == torch.float8_e4m3fn and x.dtype != torch.float32 and \
                    fp8_matmul_supported(x.device):
                try:
                    return fp8_linear(x, self.weight, self.weight_scale, self.bias)
                except RuntimeError:  # an older torch / driver without rowwise-scaled fp8: dequantise instead
                    _FP8_MATMUL["enabled"] = False
            w = dequantize_weight(self.weight.to(x.device), self.weight_scale.to(x.device), x.dtype)
            b = None if self.bias is None else self.bias.to(x.device, x.dtype)
            return F.linear(x, w, b)

    QuantLinear.__name__ = f"Quant{base.__name__}"
    return QuantLinear


class expanded_weights:
    """Within the block, quantised layers of `module` multiply with one dequantised copy of their weight.

    The head runs its layers once per sampling step (tens of times per token): expanding their weights once per
    token instead of once per call makes a quantised head as fast as a bf16 one, for a transient copy of the head's
    weights. Where fp8 multiplies natively (fp8 tensor cores) nothing is expanded.
    """

    def __init__(self, module, dtype: torch.dtype):
        modules = module.modules() if isinstance(module, nn.Module) else ()
        self.layers = [m for m in modules if getattr(m, "weight_scale", None) is not None]
        self.dtype = dtype

    def __enter__(self):
        for m in self.layers:
            native = m.weight.dtype == torch.float8_e4m3fn and self.dtype != torch.float32 and \
                fp8_matmul_supported(m.weight.device)
            if not native:
                m.expanded = dequantize_weight(m.weight, m.weight_scale, self.dtype)
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.expanded = None
        return False


def quantized_operations(fmt: str, operations=None):
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"this file is quantised as {fmt!r}, which this version cannot read; update the pack.")
    base = operations or SimpleNamespace(Linear=nn.Linear, Embedding=nn.Embedding, LayerNorm=nn.LayerNorm)
    return SimpleNamespace(Linear=make_quant_linear(base.Linear), Embedding=base.Embedding,
                           LayerNorm=getattr(base, "LayerNorm", nn.LayerNorm))
