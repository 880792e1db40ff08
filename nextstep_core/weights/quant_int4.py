"""int4 weights: group-wise (128 inputs per group) with a scale and a zero per group, weight-only.

File layout (device-neutral, what `convert --dtype int4` writes and `load_model(quantize="int4")` builds):
- `weight`: uint8 [out, in / 2], two 4-bit codes q in 0..15 per byte; input column 2j in the low nibble, 2j+1 in
  the high one;
- `weight_scale`, `weight_zero`: bfloat16 [out, in / 128];
- the weight is w[o, i] = scale[o, g] * (q[o, i] - 8) + zero[o, g] with g = i // 128 (`zero` is the value at the
  mid code 8, the convention of PyTorch's int4 kernels, so packing needs no arithmetic on the scales).

At load the codes are re-packed for the device's kernel: `torch._weight_int4pack_mm_for_cpu` on the CPU,
`torch._weight_int4pack_mm` on CUDA (sm80+) and MPS. Each layout's inverse is here too (`unpack`), because a
model that ComfyUI moves between devices has to be re-packed for the new one.
"""
from __future__ import annotations

import torch

GROUP = 128
_CPU_BLOCK = 64  # rows per block of the CPU kernel's layout (see `_cpu_codes`)
ROW_TILE = _CPU_BLOCK  # rows every layout keeps together: the CPU's 64-row blocks, CUDA's and MPS's 8-row tiles
_GPU_INNER_K_TILES = 8  # in_features must then be a multiple of 8 * 16 = 128, which GROUP already demands


def fits(out_features: int, in_features: int) -> bool:
    """Whether a [out, in] weight can be stored as int4 (else it is kept as int8: see `quant.stored_format`)."""
    return in_features % GROUP == 0 and out_features % 8 == 0


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float -> (nibbles uint8 [out, in/2], scale bf16 [out, in/128], zero bf16 [out, in/128]).

    Asymmetric min/max per group; the codes are chosen against the bf16-rounded scale and zero actually stored.
    """
    out_f, in_f = w.shape
    if not fits(out_f, in_f):
        raise ValueError(f"int4 needs in_features divisible by {GROUP} and out_features by 8, got [{out_f}, {in_f}]")
    g = w.float().reshape(out_f, in_f // GROUP, GROUP)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = ((g - zero.float()[..., None]) / scale.float()[..., None]).round_().add_(8).clamp_(0, 15).to(torch.uint8)
    return pack_nibbles(q.reshape(out_f, in_f)), scale, zero


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes [out, in] (0..15) -> uint8 [out, in/2] in the file's nibble order."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> codes uint8 [out, in]."""
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(b.shape[0], -1)


def dequantize(b: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_codes(unpack_nibbles(b), scale, zero, dtype)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [out, in] -> the float weight scale * (q - 8) + zero."""
    out_f = q.shape[0]
    w = q.reshape(out_f, scale.shape[1], GROUP).to(dtype).sub_(8)
    return w.mul_(scale.to(dtype)[..., None]).add_(zero.to(dtype)[..., None]).reshape(out_f, -1)


# ---- device layouts

def kernel_for(device: torch.device) -> str | None:
    """Which packed kernel this torch offers for the device, by name (the probe in `quant` decides if it works)."""
    if device.type == "cpu":
        return "int4_cpu" if hasattr(torch, "_weight_int4pack_mm_for_cpu") else None
    if device.type in ("cuda", "mps"):
        return "int4_gpu" if hasattr(torch, "_weight_int4pack_mm") else None
    return None


def shape_ok(kernel: str, out_features: int, in_features: int) -> bool:
    if kernel == "int4_cpu":
        return out_features % _CPU_BLOCK == 0 and in_features % GROUP == 0
    return out_features % 8 == 0 and in_features % (_GPU_INNER_K_TILES * 16) == 0


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernels' [in/128, out, 2] table (scale, zero); `scale`/`zero` become views into it again by `views`."""
    return torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()


def views(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [out, in/128] views of a [in/128, out, 2] table (no copy)."""
    return sz[..., 0].t(), sz[..., 1].t()


def pack(kernel: str, b: torch.Tensor) -> torch.Tensor:
    """File nibbles (on the target device) -> the kernel's packed weight."""
    if kernel == "int4_cpu":
        # block by block of rows (the layout is per 64-row block): the packer's input is int32, 8x the nibbles, and
        # whole-layer temporaries of varying sizes would stay in the allocator (+3.5x the int4 bytes measured)
        rows = max(_CPU_BLOCK, (1 << 20) // b.shape[1] // _CPU_BLOCK * _CPU_BLOCK)
        return torch.cat([torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(b[i:i + rows]).to(torch.int32), 1)
                          for i in range(0, b.shape[0], rows)])
    swapped = (b << 4) | (b >> 4)  # the CUDA / MPS packer wants column 2j in the HIGH nibble
    return torch._convert_weight_to_int4pack(swapped.contiguous(), _GPU_INNER_K_TILES)


def unpack(kernel: str, packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The kernel's packed weight -> file nibbles uint8 [out, in/2], on the same device."""
    if kernel == "int4_cpu":
        return pack_nibbles(_cpu_codes(packed, out_features, in_features))
    return _gpu_unpack(packed, out_features, in_features)


def codes(kernel: str, packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The kernel's packed weight -> codes uint8 [out, in] (for a dense product over many rows)."""
    if kernel == "int4_cpu":
        return _cpu_codes(packed, out_features, in_features)
    return unpack_nibbles(_gpu_unpack(packed, out_features, in_features))


def _cpu_codes(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The CPU layout: per block of 64 output rows, K-major bytes, byte (k, r) = q[r, k] | q[r + 32, k] << 4.

    Read from what the packer produces (checked by `cpu_layout_known` at load, before it is relied on).
    """
    blocks = packed.reshape(n // _CPU_BLOCK, k, _CPU_BLOCK // 2).transpose(1, 2)  # [nb, 32, k]
    return torch.stack([blocks & 15, blocks >> 4], dim=1).reshape(n, k)  # rows r and r + 32 of each block


def _gpu_unpack(packed: torch.Tensor, n: int, k: int, chunk: int = 1024) -> torch.Tensor:
    """Read the codes back through the kernel itself: identity rows against unit scales and zero 8 give q exactly."""
    dev = packed.device
    unit = torch.zeros(k // GROUP, n, 2, dtype=torch.bfloat16, device=dev)
    unit[..., 0], unit[..., 1] = 1, 8
    cols = []
    for i in range(0, k, chunk):
        eye = torch.zeros(min(chunk, k - i), k, dtype=torch.bfloat16, device=dev)
        eye.diagonal(offset=i).fill_(1)
        cols.append(torch._weight_int4pack_mm(eye, packed, GROUP, unit).round().to(torch.uint8))  # [c, n]
    return pack_nibbles(torch.cat(cols).t())


def cpu_layout_known() -> bool:
    """Whether this torch's CPU packer uses the layout `_cpu_codes` inverts (probed once on a small matrix)."""
    try:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (2 * _CPU_BLOCK, 2 * GROUP), dtype=torch.uint8, generator=g)
        b = pack_nibbles(q)
        return torch.equal(unpack("int4_cpu", pack("int4_cpu", b), *q.shape), b)
    except (RuntimeError, NotImplementedError, TypeError, AttributeError, ValueError):
        return False


def matmul(kernel: str, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w.T through the packed kernel; the CPU one runs in bf16 (its fp16/fp32 paths are slow)."""
    x2 = x.reshape(-1, x.shape[-1])
    if kernel == "int4_cpu":
        y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, GROUP, sz)
    else:
        y = torch._weight_int4pack_mm(x2.to(sz.dtype).contiguous(), packed, GROUP, sz)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
