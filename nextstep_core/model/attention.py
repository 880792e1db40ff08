"""Attention over a layer's KV cache, the masks it reads, and which SDPA kernels this device may run.

Masks are additive (0 = attend, -inf = hide) in the compute dtype, built once per forward for all layers and
materialised (contiguous, one row per query), so no kernel converts or broadcasts them again:
- `prefill_mask(real)`: causal, pads hidden from every real token; a pad query attends only to itself, which keeps it
  finite (nothing real ever reads it).
- `RowSlots.decode_mask(pos, length, group)`: one image token at slot `pos` sees slots start_b..pos of row b. Padding
  is only ever on the left, so a row's first real slot `start_b` says all there is about it. `length` is how many
  slots attention reads: pos + 1 on the plain loop, the whole cache on the fixed-shape path (the same function; the
  slots after `pos` are hidden). A single query attends as `group` rows per K/V head (see `attention`), so the
  mask has that many identical rows.

Which SDPA kernels run is probed once per device and dtype (`sdpa_backends`): every backend this torch offers is
tried on a prefill and a decode problem of the model's head size and checked against the plain formula; one that
raises or disagrees is logged and never used. `NextStep.forward` runs under the working set.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("nextstep")

# SDPA reads grouped K/V natively from torch 2.5 on; older torch gets an explicit repeat.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def prefill_mask(real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, S, S] for a prompt of S tokens whose real (non-pad) ones are `real` [B, S]."""
    s = real.shape[1]
    idx = torch.arange(s, device=real.device)
    causal = idx[None, :] <= idx[:, None]
    own = idx[None, :] == idx[:, None]
    visible = (causal[None] & real[:, None, :]) | own[None]
    return _additive(visible[:, None], dtype)


class RowSlots:
    """Which cache slots each guidance row may attend to when one token is decoded: its real (non-pad) slots up to
    the token's own. Padding is only ever on the left, so row b's first real slot `start[b]` says all there is; the
    comparison with it is made once per generation, not per token."""

    def __init__(self, start: torch.Tensor, length: int, dtype: torch.dtype):
        self.slots = torch.arange(length, device=start.device)
        self.real = self.slots[None, :] >= start[:, None]  # [B, length]
        self.values = torch.tensor([0.0, float("-inf")], dtype=dtype, device=start.device)  # attend, hide

    def refill(self, start: torch.Tensor) -> None:
        """Another generation's rows in the same buffers (a captured graph keeps reading them)."""
        torch.ge(self.slots[None, :], start[:, None], out=self.real)

    def decode_mask(self, pos: torch.Tensor, length: int, group: int = 1) -> torch.Tensor:
        """[B, 1, group, length]: slots start_b..pos are seen. `pos` is a [1] device tensor (no host sync)."""
        visible = self.real[:, :length] & (self.slots[:length] <= pos)
        mask = torch.where(visible, self.values[0], self.values[1])
        return mask[:, None, None, :].expand(-1, -1, group, -1).contiguous()


def decode_mask(start: torch.Tensor, pos: torch.Tensor, length: int, dtype: torch.dtype, group: int = 1):
    """`RowSlots(start, length, dtype).decode_mask(pos, length, group)`, for a single step."""
    return RowSlots(start, length, dtype).decode_mask(pos, length, group)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.full((), float("-inf"), dtype=dtype, device=visible.device))


def attention(q, k, v, mask, backend: str = "sdpa"):
    """q [B,Hq,S,D], k/v [B,Hkv,L,D], mask [B,1,S,L] additive (decode: [B,1,Hq/Hkv,L]) or None for "all L slots"."""
    if backend == "flash" and mask is None and q.is_cuda:
        from flash_attn import flash_attn_func  # optional; the loader checked it imports

        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    if hkv != hq and s == 1:
        # one query token: the heads of a K/V group become the query rows of that group, so attention is plain
        # (no repeat, no enable_gqa) and can take the flash / memory-efficient / cuDNN kernels
        folded = q.reshape(b, hkv, hq // hkv, d)
        return F.scaled_dot_product_attention(folded, k, v, attn_mask=mask).reshape(b, hq, 1, d)
    if hkv != hq:
        if _SDPA_HAS_GQA and q.device.type != "mps":  # MPS kernels have lagged behind on enable_gqa: repeat there
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---- which SDPA kernels may run here

def _backend_api():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no per-call choice; PyTorch's own dispatch decides
        return None, None
    return SDPBackend, sdpa_kernel


def _reference(q, k, v, mask):
    """softmax(q kᵀ / √d + mask) v in float32: what every kernel must agree with."""
    scores = q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask.float()
    return torch.softmax(scores, -1) @ v.float()


def _problems(device, dtype, head_dim: int):
    """A prefill (with left padding) and a folded decode step of this head size, as the model runs them."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    real = torch.ones(2, 24, dtype=torch.bool)
    real[1, :5] = False
    pre = (rand(2, 4, 24, head_dim), rand(2, 4, 24, head_dim), rand(2, 4, 24, head_dim),
           prefill_mask(real.to(device), dtype))
    start = torch.tensor([0, 5], device=device)
    dec = (rand(2, 2, 4, head_dim), rand(2, 2, 64, head_dim), rand(2, 2, 64, head_dim),
           decode_mask(start, torch.tensor([40], device=device), 64, dtype, group=4))
    return pre, dec


def _run(backend, q, k, v, mask):
    """SDPA with only `backend` allowed (raises where it cannot take the problem)."""
    with _backend_api()[1]([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@functools.lru_cache(maxsize=None)
def sdpa_backends(device: str, dtype: torch.dtype, head_dim: int) -> tuple:
    """The SDPA backends that run here and agree with the plain formula, in PyTorch's order of preference.

    Empty when this torch cannot choose kernels per call (then PyTorch's own dispatch runs, unchanged)."""
    SDPBackend, _ = _backend_api()
    if SDPBackend is None:
        return ()
    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    candidates = [getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)]
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    working, refused = [], []
    for backend in candidates:
        try:
            worst = 0.0
            for q, k, v, mask in _problems(torch.device(device), dtype, head_dim):
                got = _run(backend, q, k, v, mask)
                worst = max(worst, float((got.float() - _reference(q, k, v, mask)).abs().max()))
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
            refused.append(f"{backend.name} ({str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__})")
            continue
        if worst <= tol:
            working.append(backend)
        else:
            refused.append(f"{backend.name} (wrong numbers: max error {worst:.3g})")
            log.warning("NextStep: attention kernel %s on %s in %s gives wrong numbers (max error %.3g); it is "
                        "not used.", backend.name, device, dtype, worst)
    log.info("NextStep: attention kernels on %s in %s: %s%s", device, dtype,
             ", ".join(b.name.lower() for b in working) or "none", f" (not used: {'; '.join(refused)})" if refused else "")
    return tuple(working)


def backend_names(device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """The working SDPA backends' names (for `doctor` and logs); ['default'] where torch cannot choose."""
    if _backend_api()[0] is None:
        return ["default"]
    return [b.name.lower() for b in sdpa_backends(str(torch.device(device)), dtype, head_dim)] or ["none"]


def use_backends(device, dtype: torch.dtype, head_dim: int):
    """A context under which SDPA only runs the kernels `sdpa_backends` found working (a no-op where it can't)."""
    found = sdpa_backends(str(device), dtype, head_dim)
    _, sdpa_kernel = _backend_api()
    if not found or sdpa_kernel is None:
        return contextlib.nullcontext()
    return sdpa_kernel(list(found))
