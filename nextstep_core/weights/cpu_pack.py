"""Dense Linear weights kept in oneDNN's blocked layout on x86 CPUs, so a matmul stops re-laying them out per call.

`F.linear` on the CPU re-packs the weight into the blocked layout its kernel reads on every call. For the 1–4 rows
of a decode step that repacking is most of the work: on the shared EPYC VM of `bench/RESULTS.md` a 768x768 bf16
head layer at 2 rows takes 93 µs through `F.linear` and 42 µs from a weight packed once; a 1024x2816 decoder
projection about 1.5x less. So after loading, `pack_linears` replaces the weight of every plain dense Linear on the
CPU (in fp32, those big enough to gain) by its packed form (`torch.ops.mkldnn._reorder_linear_weight`), and the
layer multiplies through `torch.ops.mkldnn._linear_pointwise`. The packed tensor replaces the dense one (no second
copy); `state_dict()` still gives the dense tensor under the published key, and a device or dtype move unpacks
first, then packs again where it lands.

Numbers: bf16 products are bit-identical to `F.linear`; fp32 ones differ by summation order only (~1e-7 relative),
like any two BLAS calls. Whether packing works is probed once per dtype (the op can be missing from a build, or bf16
unsupported on the CPU), and a layer a host supplies (ComfyUI's weight-streaming Linear) is never touched.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import platform
import sys

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("nextstep")

_ROWS_HINT = 2  # the layout is chosen for a decode step's few rows; it is still correct (and fast) for a prefill
_X86 = ("x86_64", "amd64", "i686", "x86")
_TRIM_EVERY = 32 << 20  # bytes packed between handing freed heap pages back to the OS
# fp32 weights below this many elements stay with F.linear: for them the packed op's fixed cost per call (~15 µs)
# is more than the re-layout it saves (bench/RESULTS.md: 384x384 packed 0.9x, 512x512 1.3x). bf16 gains at every size.
MIN_FP32_WEIGHT = 1 << 18


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), _ROWS_HINT)


def _packed_linear(x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


@functools.lru_cache(maxsize=None)
def packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU pack `dtype` weights and get the dense product back (decided once).

    x86 only: elsewhere oneDNN's CPU matmul is a different library whose speed was not measured."""
    if dtype not in (torch.float32, torch.bfloat16) or platform.machine().lower() not in _X86:
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        g = torch.Generator().manual_seed(0)
        w, b, x = (torch.randn(*shape, generator=g).to(dtype) for shape in ((96, 64), (96,), (3, 64)))
        want = F.linear(x, w, b).float()
        err = ((_packed_linear(x, _pack(w), b).float() - want).norm() / want.norm()).item()
    except Exception as e:  # whatever a build without the op or without bf16 support raises
        log.info("NextStep: packed CPU matmul unavailable in %s (%s); using F.linear", dtype, e)
        return False
    if not err < 1e-2:
        log.warning("NextStep: packed CPU matmul gives wrong numbers in %s (rel err %.3g); using F.linear", dtype, err)
        return False
    return True


def _can_pack(layer: nn.Module) -> bool:
    cls = getattr(type(layer), "packed_base", type(layer))
    plain = cls is nn.Linear or (getattr(cls, "host_linear", None) is nn.Linear  # a QuantLinear holding a dense weight
                                 and getattr(layer, "weight_scale", None) is None)
    w = layer.weight
    # inference weights only: the packed op has no backward
    return plain and w.device.type == "cpu" and not w.requires_grad and packing_works(w.dtype) \
        and (w.dtype != torch.float32 or w.numel() >= MIN_FP32_WEIGHT) \
        and (layer.bias is None or layer.bias.dtype == w.dtype)


@functools.lru_cache(maxsize=None)
def _packed_class(base: type) -> type:
    class PackedLinear(base):
        """`base` whose weight may be held packed for the CPU (`weight.is_mkldnn`)."""
        packed_base = base

        def forward(self, x):
            w = self.weight
            if not w.is_mkldnn:
                return super().forward(x)
            if x.device.type == "cpu" and x.dtype == w.dtype:
                return _packed_linear(x, w, self.bias)
            return F.linear(x, w.to_dense().to(x.device, x.dtype), None if self.bias is None
                            else self.bias.to(x.device, x.dtype))

        def unpack(self) -> None:
            if self.weight.is_mkldnn:
                self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=False)

        def _apply(self, fn, *args, **kwargs):
            # the packed layout is the CPU's: back to dense, move or cast, pack again if it stays on the CPU
            self.unpack()
            out = super()._apply(fn, *args, **kwargs)
            if _can_pack(self):
                self.weight = nn.Parameter(_pack(self.weight), requires_grad=False)
            return out

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            if self.weight.is_mkldnn:
                destination[prefix + "weight"] = self.weight.to_dense()

    PackedLinear.__name__ = f"Packed{base.__name__}"
    return PackedLinear


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, or None (other C libraries, other systems)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def pack_linears(model: nn.Module) -> int:
    """Packs every eligible dense Linear of `model` in place, one layer at a time; returns how many.

    The packed copy is allocated before the dense one is freed, and glibc keeps most freed blocks for later instead
    of reusing them for the next packed copy, so without a trim the load peak would grow by a tenth of the weights
    (measured on the medium checkpoint); handing freed pages back every few tens of MB keeps it where it was."""
    n, since_trim = 0, 0
    for layer in model.modules():
        if isinstance(layer, nn.Linear) and not getattr(layer.weight, "is_mkldnn", False) and _can_pack(layer):
            layer.__class__ = _packed_class(type(layer))
            since_trim += layer.weight.numel() * layer.weight.element_size()
            layer.weight = nn.Parameter(_pack(layer.weight), requires_grad=False)
            n += 1
            if since_trim >= _TRIM_EVERY and _malloc_trim() is not None:
                _malloc_trim()(0)
                since_trim = 0
    if since_trim and _malloc_trim() is not None:
        _malloc_trim()(0)
    return n


def unpack_linears(model: nn.Module) -> int:
    """Back to dense weights and `F.linear` (the benchmark's side-by-side baseline); returns how many."""
    n = 0
    for layer in model.modules():
        if hasattr(layer, "unpack") and getattr(layer.weight, "is_mkldnn", False):
            layer.unpack()
            n += 1
    return n
