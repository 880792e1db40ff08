"""Weight-only quantisation: int8 or fp8 (e4m3fn) with one float32 scale per output channel, or int4 group-wise.

Weights stay quantised in memory and multiply through PyTorch's packed kernels where the device has them:
`torch._weight_int8pack_mm` for int8, `torch._weight_int4pack_mm(_for_cpu)` for int4 (`quant_int4`). Which path a
layer runs is decided once, when the model is loaded or moved to another device (`QuantLinear.prepare`, with a
probe per kernel and device that also checks the numbers); a layer whose kernel is missing or fails dequantises
instead: its codes cast to the compute dtype, one matmul, the per-channel scale applied to the output.

fp8 multiplies on fp8 tensor cores where the GPU has them (`quant_fp8`: activations quantised per row, then
`torch._scaled_mm`); elsewhere fp8 weights dequantise as above, which is slower than bf16 (said once).
`NEXTSTEP_FP8_MATMUL` (read at load) overrides the choice: 1 uses `_scaled_mm` wherever it runs, 0 never.

Which layers are quantised is decided when a file is written (`stored_format`): int8 takes the decoder's projections
and the head's residual blocks; int4 and fp8 take the decoder's projections only (int4's error is too large for the
head, which runs 50 times per token; at a decode step's 2 rows, fp8's quantise-then-multiply would cost the head
more than it saves). The head layers of fp8 files written before that are dequantised to the compute dtype at load.
Embeddings, projectors, norms and the head's other layers stay in high precision.

An int4 / int8 model loaded on one device for another (ComfyUI loads on the CPU and moves the model to the GPU when
it runs, `prepare_quantized(target=...)`) keeps the file layout until it reaches the target, so its weights are
packed once, for the device that multiplies them. A layer int4 cannot take (in_features not a multiple of 128, out_features not of 8) is stored as
int8 instead. q/k/v and gate/up are merged at load (`merge.py`) in the file layout, before `prepare` packs them.
"""
from __future__ import annotations

import contextvars
import functools
import logging
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from . import quant_fp8, quant_int4
from .quant_fp8 import FP8_MAX, fp8_linear

log = logging.getLogger("nextstep")

QUANT_FORMATS = ("fp8", "int8", "int4")
QUANT_SUFFIXES = (".weight_scale", ".weight_zero")
PACKED_ROWS = 16  # above this many rows the CPU's packed kernels are slower than dequantise + a dense matmul
_DECODER = r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
_HEAD = r"image_head\.net\.res_blocks\.\d+\.(mlp\.[02]|adaLN_modulation\.1)"
_KEYS = {"fp8": re.compile(rf"^{_DECODER}\.weight$"), "int8": re.compile(rf"^({_DECODER}|{_HEAD})\.weight$"),
         "int4": re.compile(rf"^{_DECODER}\.weight$")}
# what torch raises for an op this build, device or GPU generation does not have
_UNSUPPORTED = (RuntimeError, NotImplementedError, TypeError, AttributeError, ValueError, AssertionError)


def should_quantize(key: str, fmt: str = "int8") -> bool:
    return bool(_KEYS.get(fmt, _KEYS["int8"]).match(key))


def stored_format(key: str, shape, fmt: str) -> str | None:
    """The format `key` is stored in under the file format `fmt` (None: kept in high precision)."""
    if not should_quantize(key, fmt):
        return None
    if fmt == "int4" and not quantize_int4_fits(shape):
        return "int8"
    return fmt


def quantize_int4_fits(shape) -> bool:
    return len(shape) == 2 and quant_int4.fits(shape[0], shape[1])


def stored_plan(key: str, shape, fmt: str) -> list[tuple[str, torch.dtype, tuple]] | None:
    """[(key, dtype, shape)] a quantised file holds for one weight, or None if it is not quantised."""
    f = stored_format(key, shape, fmt)
    base = key[: -len("weight")]
    if f == "int4":
        groups = (shape[0], shape[1] // quant_int4.GROUP)
        return [(key, torch.uint8, (shape[0], shape[1] // 2)), (base + "weight_scale", torch.bfloat16, groups),
                (base + "weight_zero", torch.bfloat16, groups)]
    if f in ("fp8", "int8"):
        return [(key, torch.float8_e4m3fn if f == "fp8" else torch.int8, tuple(shape)),
                (base + "weight_scale", torch.float32, (shape[0],))]
    return None


def quantized_tensors(key: str, w: torch.Tensor, fmt: str) -> list[tuple[str, torch.Tensor]] | None:
    """[(key, tensor)] matching `stored_plan`, or None if `key` stays in high precision."""
    plan = stored_plan(key, tuple(w.shape), fmt)
    if plan is None:
        return None
    parts = quantize_weight(w, stored_format(key, tuple(w.shape), fmt))
    return [(k, t) for (k, _, _), t in zip(plan, parts)]


def stored_shape(key: str, shape, fmt: str) -> tuple:
    """The shape `key` has in a file quantised as `fmt` (the int4 weight holds two codes per byte)."""
    plan = stored_plan(key, shape, fmt)
    return tuple(plan[0][2]) if plan else tuple(shape)


def stored_shapes(expected: dict, fmt: str | None) -> dict:
    """{key: shape} of a module as a file quantised as `fmt` holds it (None: unchanged)."""
    return {k: stored_shape(k, s, fmt) for k, s in expected.items()} if fmt else expected


def quantize_weight(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, ...]:
    """[out, in] float weight -> (codes, float32 scale [out]) for fp8 / int8; (nibbles, scale, zero) for int4."""
    if fmt == "int4":
        return quant_int4.quantize(w)
    w = w.float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    if fmt == "fp8":
        scale = amax / FP8_MAX
        return (w / scale[:, None]).to(torch.float8_e4m3fn), scale
    if fmt == "int8":
        scale = amax / 127.0
        return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale
    raise ValueError(f"unknown quantisation {fmt!r}; use one of {QUANT_FORMATS}")


def cast_codes(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 / fp8 codes -> `dtype`, unscaled (exact: every code is representable)."""
    if q.dtype == torch.float8_e4m3fn and q.device.type == "cpu":
        # CPU casts fp8 element by element (about 0.5 G/s); a 256-entry table lookup is exact and 2-3x faster
        table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(dtype)
        codes = q.view(torch.uint8)
        w = torch.empty(q.shape, dtype=dtype)
        rows = max(1, (1 << 20) // max(1, q.shape[-1]))  # bounded index temporaries (8 bytes per element)
        for i in range(0, q.shape[0], rows):
            w[i:i + rows] = torch.take(table, codes[i:i + rows].long())
        return w
    return q.to(dtype)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, zero=None) -> torch.Tensor:
    """The float weight a quantised one stands for (int4: pass its `zero` too)."""
    if zero is not None:
        return quant_int4.dequantize(q, scale, zero, dtype)
    return cast_codes(q, dtype).mul_(scale[:, None].to(dtype))


# ---- which kernel a layer runs: probed once per (kernel, device, dtype)

def _run_kernel(kernel: str, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero) -> torch.Tensor:
    """One probe product through `kernel`, from file-layout tensors on x's device."""
    if kernel == "int8_pack":
        return torch._weight_int8pack_mm(x, w, scale.to(x.dtype))
    if kernel == "fp8_scaled_mm":
        return fp8_linear(x, w, scale, None)
    sz = quant_int4.scales_and_zeros(scale, zero, _int4_table_dtype(x.device, x.dtype))
    return quant_int4.matmul(kernel, x, quant_int4.pack(kernel, w), sz)


@functools.lru_cache(maxsize=None)
def kernel_works(kernel: str, device: str, dtype: torch.dtype) -> bool:
    """Whether `kernel` runs here and matches the dequantised product (2 % of its norm; bf16 round-off is ~0.5 %).

    Called at load and after a device move, never per call; `kernel_works.cache_clear()` forgets the answers.
    """
    dev = torch.device(device)
    if kernel == "int4_cpu" and not quant_int4.cpu_layout_known():
        return False  # the weights could not be moved off this device again
    fmt = {"int8_pack": "int8", "fp8_scaled_mm": "fp8"}.get(kernel, "int4")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g)
    x = torch.randn(3, 256, generator=g).to(dev, dtype)
    parts = [p.to(dev) for p in quantize_weight(w, fmt)]
    try:
        got = _run_kernel(kernel, x, *parts, *([None] * (3 - len(parts)))).float()
        ref = F.linear(x.float(), dequantize_weight(*parts[:2], torch.float32, *parts[2:]))
        err = float((got - ref).norm() / ref.norm())
    except _UNSUPPORTED as e:
        log.info("NextStep: %s is unavailable on %s in %s (%s); dequantising instead", kernel, device, dtype,
                 str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    tol = quant_fp8.SCALED_MM_TOLERANCE if kernel == "fp8_scaled_mm" else 0.02
    if err > tol:
        log.warning("NextStep: %s on %s gives wrong numbers (rel err %.3g); dequantising instead", kernel, device, err)
    return err <= tol


def _int4_table_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The scales/zeros dtype the int4 kernel takes: bf16 on CPU and CUDA, the activation dtype on MPS."""
    return dtype if device.type == "mps" else torch.bfloat16


def _choose_kernel(fmt: str, device: torch.device, dtype: torch.dtype, shape) -> str:
    if fmt == "int8":
        candidate = "int8_pack" if hasattr(torch, "_weight_int8pack_mm") else None
    elif fmt == "int4":
        candidate = quant_int4.kernel_for(device)
        candidate = candidate if candidate and quant_int4.shape_ok(candidate, *shape) else None
    else:
        forced = os.environ.get("NEXTSTEP_FP8_MATMUL", "")
        native = forced == "1" or (forced != "0" and quant_fp8.tensor_cores(device))
        candidate = "fp8_scaled_mm" if native and shape[0] % 16 == 0 and shape[1] % 16 == 0 else None
    return candidate if candidate and kernel_works(candidate, str(device), dtype) else "dequant"


# ---- the layer

_EXPANDED: contextvars.ContextVar = contextvars.ContextVar("nextstep_expanded_weights", default=None)


def make_quant_linear(base: type) -> type:
    """A Linear (subclass of the host's Linear class) that also holds a quantised weight + `weight_scale`."""

    class QuantLinear(base):
        # set by `prepare`: dense (not quantised), int8_pack, int4_cpu, int4_gpu, fp8_scaled_mm or dequant
        kernel = "dense"
        target = None  # the device the kernel is chosen for; elsewhere the file layout is kept (`prepare`)
        host_linear = base
        fmt = None
        compute_dtype = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("weight_scale", None)
            self.register_buffer("weight_zero", None)
            # derived at load for the kernel: the scale in the compute dtype (int8 / fp8), int4's packed table
            self.register_buffer("scale_c", None, persistent=False)
            self.register_buffer("scales_and_zeros", None, persistent=False)

        def prepare(self, dtype: torch.dtype, target=None) -> None:
            """Pick this layer's kernel for its device and lay the weight out for it (at load, after a move). Away
            from the `target` device (kept from the first call) the weight stays in the file layout, unpacked."""
            if self.weight_scale is None or self.weight.device.type == "meta":
                return
            self._unpack()
            self.fmt = "int4" if self.weight_zero is not None else \
                "fp8" if self.weight.dtype == torch.float8_e4m3fn else "int8"
            self.compute_dtype = dtype
            self.target = torch.device(target) if target is not None else self.target
            if self.target is not None and not _same_device(self.weight.device, self.target):
                self.kernel, self.scale_c = "dequant", self.weight_scale.to(dtype) if self.fmt != "int4" else None
                return
            self.kernel = _choose_kernel(self.fmt, self.weight.device, dtype, (self.out_features, self.in_features))
            if self.fmt == "fp8" and self.kernel == "dequant":
                quant_fp8.warn_dequantises(self.weight.device, dtype)
            self.scale_c = self.weight_scale.to(dtype) if self.fmt != "int4" else None
            if self.kernel.startswith("int4_"):
                sz = quant_int4.scales_and_zeros(self.weight_scale, self.weight_zero,
                                                 _int4_table_dtype(self.weight.device, dtype))
                self.weight = nn.Parameter(quant_int4.pack(self.kernel, self.weight.data), requires_grad=False)
                self.scales_and_zeros = sz
                self.weight_scale, self.weight_zero = quant_int4.views(sz)  # no second copy of the table

        @property
        def row_block(self) -> int:
            """Rows the weight's packed layouts keep together (merges and state_dict splits happen between them)."""
            return quant_int4.ROW_TILE if self.weight_zero is not None else 1

        def plain_weight(self) -> torch.Tensor:
            """The weight in the file layout, on its device (int4 packed for a kernel: unpacked)."""
            if self.kernel.startswith("int4_"):
                return quant_int4.unpack(self.kernel, self.weight.data, self.out_features, self.in_features)
            return self.weight.data

        def _unpack(self) -> None:
            """Back to the file layout (a no-op unless the weight is packed for an int4 kernel)."""
            if self.kernel.startswith("int4_"):
                self.weight = nn.Parameter(self.plain_weight(), requires_grad=False)
                self.weight_scale = self.weight_scale.contiguous()
                self.weight_zero = self.weight_zero.contiguous()
                self.scales_and_zeros = None
                self.kernel = "dequant"

        def _apply(self, fn, *args, **kwargs):
            # packed layouts are device-specific: back to the file layout, move, re-pack for the new device
            self._unpack()
            out = super()._apply(fn, *args, **kwargs)
            if self.compute_dtype is not None:
                self.prepare(self.compute_dtype)
            return out

        def forward(self, x):
            if self.weight_scale is None:
                return super().forward(x)
            if x.device != self.weight.device:  # ComfyUI low-VRAM mode can leave a layer's weights elsewhere
                return self._dequant_forward(x, self.plain_weight().to(x.device))
            kernel = self.kernel
            few_rows = x.numel() <= PACKED_ROWS * x.shape[-1]  # decoding; a prompt's prefill has more
            if kernel == "int8_pack" and few_rows:
                x2 = x.reshape(-1, x.shape[-1])
                y = torch._weight_int8pack_mm(x2, self.weight, self._scale(x.dtype))
                y = y.reshape(*x.shape[:-1], y.shape[-1])
            elif kernel == "int4_gpu" or (kernel == "int4_cpu" and few_rows):
                y = quant_int4.matmul(kernel, x, self.weight, self.scales_and_zeros)
            elif kernel == "fp8_scaled_mm":
                return fp8_linear(x, self.weight, self.weight_scale, self.bias)
            else:
                return self._dequant_forward(x, self.weight)
            return y if self.bias is None else y.add_(self.bias.to(y.dtype))

        def _scale(self, dtype):
            s = self.scale_c if self.scale_c is not None else self.weight_scale
            return s if s.dtype == dtype else s.to(dtype)

        def _dequant_forward(self, x, w):
            """Codes cast to the compute dtype, one matmul, the per-channel scale on the (small) output."""
            bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
            cache = _EXPANDED.get()
            if cache is not None and self in cache:  # inside `expanded_weights`: one expanded copy per block
                if cache[self] is None:
                    cache[self] = self._expand(w, x.dtype)
                return F.linear(x, cache[self], bias)
            if self.weight_zero is not None or x.dtype == torch.float16:  # fp16: codes up to 127 could overflow
                return F.linear(x, self._expand(w, x.dtype), bias)
            y = F.linear(x, cast_codes(w, x.dtype))
            s = self._scale(x.dtype).to(x.device)
            return y.mul_(s) if bias is None else torch.addcmul(bias, y, s)

        def _expand(self, w, dtype):
            """The weight `w` (this layer's, or its copy on another device) expanded to `dtype`."""
            if self.weight_zero is None:
                return dequantize_weight(w, self.weight_scale.to(w.device), dtype)
            q = quant_int4.codes(self.kernel, w, self.out_features, self.in_features) \
                if self.kernel.startswith("int4_") and w is self.weight else quant_int4.unpack_nibbles(w)
            return quant_int4.dequantize_codes(q, self.weight_scale.to(w.device), self.weight_zero.to(w.device), dtype)

    QuantLinear.__name__ = f"Quant{base.__name__}"
    return QuantLinear


def prepare_quantized(model: nn.Module, dtype: torch.dtype, target=None) -> dict:
    """Choose every quantised layer's kernel and pack its weight for the device (or, with a `target` device the
    model will move to, keep the file layout until it is there); returns {kernel: layer count}."""
    counts = {}
    for m in model.modules():
        if hasattr(m, "prepare") and getattr(m, "weight_scale", None) is not None:
            m.prepare(dtype, target)
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def use_reference_kernels(model: nn.Module) -> None:
    """Every quantised layer dequantises instead (codes cast, one matmul, the scale on the output): the reference
    the packed kernels are measured against (`doctor`). A later device move chooses the kernels again."""
    for m in model.modules():
        if hasattr(m, "prepare") and getattr(m, "weight_scale", None) is not None:
            m._unpack()
            m.kernel = "dequant"


class expanded_weights:
    """Within the block, quantised layers of `module` that dequantise per call reuse one expanded copy instead.

    The head runs its layers once per sampling step (tens of times per token): where a layer has no packed kernel
    (fp8, or int8 without `_weight_int8pack_mm`), expanding its weight once per token instead of once per call
    makes it about as fast as bf16. Layers with a packed kernel need nothing. The copies live in a context
    variable for the duration of the block; nothing is written onto the modules.
    """

    def __init__(self, module, dtype: torch.dtype):
        modules = module.modules() if isinstance(module, nn.Module) else ()
        self.layers = [m for m in modules if getattr(m, "weight_scale", None) is not None
                       and getattr(m, "kernel", None) == "dequant"]
        self.dtype = dtype
        self._token = None

    def __enter__(self):
        self._token = _EXPANDED.set(dict.fromkeys(self.layers))
        return self

    def __exit__(self, *exc):
        _EXPANDED.reset(self._token)
        return False


def quantized_operations(fmt: str, operations=None):
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"this file is quantised as {fmt!r}, which this version cannot read; update the pack.")
    ops = operations or nn
    return _QuantOps(make_quant_linear(ops.Linear), ops.Embedding, getattr(ops, "LayerNorm", nn.LayerNorm))


class _QuantOps:
    """The layer classes a quantised model is built from: the host's, with its Linear made quantisable."""

    def __init__(self, linear, embedding, layer_norm):
        self.Linear, self.Embedding, self.LayerNorm = linear, embedding, layer_norm
