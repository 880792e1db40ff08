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

The CPU packer's layout depends on the instruction set PyTorch dispatches to (PyTorch's `int4mm_kernel.cpp`: blocks
of 4 vector widths of rows, so 64 with AVX-512, 32 with AVX2 or without vector code, 16 with Arm's NEON; rows
paired half a block apart on AVX-512 / AVX2, side by side elsewhere), so it is read from the packer itself once per
process (`cpu_layout`) rather than assumed; a layout it cannot read leaves int4 dequantising.
"""
from __future__ import annotations

import functools

import torch

GROUP = 128
# rows every layout keeps together: the CPU's blocks (64, 32 or 16 rows, `cpu_layout`), CUDA's and MPS's 8-row tiles
ROW_TILE = 64
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
        return out_features % ROW_TILE == 0 and in_features % GROUP == 0
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
        # a few blocks of rows at a time (the layout is per block of rows, and blocks divide ROW_TILE): the packer's
        # input is int32, 8x the nibbles, and whole-layer temporaries of varying sizes would stay in the allocator
        # (+3.5x the int4 bytes measured)
        rows = max(ROW_TILE, (1 << 20) // b.shape[1] // ROW_TILE * ROW_TILE)
        return torch.cat([_cpu_pack_codes(unpack_nibbles(b[i:i + rows])) for i in range(0, b.shape[0], rows)])
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
    """The CPU layout -> codes uint8 [n, k]. Per block of `block` output rows, K-major, `block` nibbles per input
    column (low nibble first); nibble p of a column holds the block's row `rows[p]` (`cpu_layout`)."""
    block, rows = cpu_layout()
    return _from_blocks(_nibbles(packed), n, k, block, rows)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> their nibbles in memory order (low, then high), flat."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten()


def _from_blocks(nibbles: torch.Tensor, n: int, k: int, block: int, rows: torch.Tensor) -> torch.Tensor:
    blocks = nibbles.reshape(n // block, k, block)[..., torch.argsort(rows)]  # [n / block, k, row in block]
    return blocks.transpose(1, 2).reshape(n, k)


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


@functools.lru_cache(maxsize=None)
def cpu_layout() -> tuple[int, torch.Tensor] | None:
    """(rows per block, the row of the block each nibble of a column holds) of this process's CPU packer; None
    where its output is no such layout (int4 then dequantises on the CPU).

    Read from the packer: rows tagged with their number (low bits, then high bits) give the row order of the first
    column; the block is the first size whose first column holds each of its rows once and that unpacks a random
    matrix back to itself. Blocks divide ROW_TILE, where merged layers split.
    """
    try:
        tag = torch.arange(ROW_TILE)[:, None].expand(ROW_TILE, GROUP)
        order = _nibbles(_cpu_pack_codes(tag % 16)).long() + 16 * _nibbles(_cpu_pack_codes(tag // 16)).long()
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (2 * ROW_TILE, 2 * GROUP), dtype=torch.uint8, generator=g)
        q_packed = _nibbles(_cpu_pack_codes(q))
        for block in (2, 4, 8, 16, 32, 64):
            rows = order[:block].clone()
            if torch.equal(rows.sort().values, torch.arange(block)) and \
                    torch.equal(_from_blocks(q_packed, *q.shape, block, rows), q):
                return block, rows
    except (RuntimeError, NotImplementedError, TypeError, AttributeError, ValueError):
        pass
    return None


def cpu_layout_known() -> bool:
    """Whether this torch's CPU packer uses a layout `_cpu_codes` inverts (probed once per process)."""
    return cpu_layout() is not None


def _cpu_pack_codes(q: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def matmul(kernel: str, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w.T through the packed kernel; the CPU one runs in bf16 (its fp16/fp32 paths are slow)."""
    x2 = x.reshape(-1, x.shape[-1])
    if kernel == "int4_cpu":
        y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, GROUP, sz)
    else:
        y = torch._weight_int4pack_mm(x2.to(sz.dtype).contiguous(), packed, GROUP, sz)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
