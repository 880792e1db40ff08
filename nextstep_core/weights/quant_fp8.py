"""fp8 (e4m3fn) weights: the tensor-core product, when to use it, and the head kept in high precision.

On GPUs with fp8 matmul (CUDA compute capability 8.9 and up) a layer quantises its activations per row inside the
step (scale = amax / 448) and multiplies through `torch._scaled_mm` with the weights' per-row scales: one byte read
per weight. `quant._choose_kernel` picks it there (probed against the dequantised product, within
`SCALED_MM_TOLERANCE`: the rounding of activations to e4m3); elsewhere the weights are dequantised per call, which is
slower than bf16 weights, and `warn_dequantises` says so once per device.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger("nextstep")

FP8_MAX = 448.0  # the largest e4m3fn value
SCALED_MM_TOLERANCE = 0.05  # activations rounded to e4m3 (3 mantissa bits): about 3 % of the product's norm


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias) -> torch.Tensor:
    """x @ w.T in fp8: activations quantised per row (scale = amax / 448), weights per output channel."""
    x2 = x.reshape(-1, x.shape[-1])
    a_scale = torch.linalg.vector_norm(x2, float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    a_scale = a_scale.div_(FP8_MAX).clamp_(min=1e-12)
    xq = (x2 / a_scale).to(torch.float8_e4m3fn)
    b = None if bias is None else bias.to(x.dtype)
    out = torch._scaled_mm(xq, w.t(), scale_a=a_scale, scale_b=w_scale[None, :].float(), bias=b, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], w.shape[0])


def tensor_cores(device: torch.device) -> bool:
    """Whether the device multiplies fp8 natively: CUDA compute capability 8.9 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@functools.lru_cache(maxsize=None)
def warn_dequantises(device: torch.device, dtype: torch.dtype) -> None:
    """Once per device: fp8 weights that dequantise (no fp8 matmul there) run slower than bf16 weights would."""
    log.warning("NextStep: %s has no fp8 matmul (it needs a CUDA GPU of compute capability 8.9 or newer: Ada, "
                "Hopper and later): fp8 weights are cast to %s on every call there, which is slower than bf16 "
                "weights. For less memory at full speed on this device, use an int8 or int4 file.", device, dtype)


def dense_head(model: nn.Module, dtype: torch.dtype) -> int:
    """The head's quantised layers of an fp8 file written when fp8 still took the head, dequantised to `dtype`
    (the head stays in high precision in fp8 mode); returns how many."""
    n = 0
    for m in model.image_head.modules():
        if getattr(m, "weight_scale", None) is not None and m.weight.dtype == torch.float8_e4m3fn:
            w = m.weight.data.to(dtype).mul_(m.weight_scale[:, None].to(dtype))
            m.weight = nn.Parameter(w, requires_grad=False)
            m.weight_scale = m.scale_c = None
            m.kernel, m.fmt = "dense", None
            n += 1
    return n
