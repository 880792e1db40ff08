"""Everything that ties the engine to ComfyUI's runtime: model management, progress, previews, interrupts.

The engine never sees a ComfyUI object; it gets layer classes (`operations`), a device, a progress callback and
a cancellation check. This module builds those from ComfyUI's own machinery, in ways that work from the March-2024
ComfyUI to current releases (newer names are looked up with getattr and fall back to older ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils

from ..nextstep_core.errors import NextStepError

from ..nextstep_core.frontend.devices import auto_dtype

PREVIEW_FRAMES = 32  # previews per image: about one per row of tokens at square sizes, cheap next to a token


@dataclass
class Managed:
    """A pack value (NEXTSTEP_MODEL / NEXTSTEP_VAE): the engine module, its ComfyUI patcher, where it came from."""
    module: Any
    patcher: Any
    path: str

    @property
    def config(self):
        return self.module.config


class NextStepManaged(torch.nn.Module):
    """What the patcher manages: ModelPatcher writes bookkeeping attributes onto its module (`device`,
    `model_loaded_weight_memory`, ...), and the engine's modules expose `device` as a read-only property."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.engine = module

    def _apply(self, fn, *args, **kwargs):
        # ComfyUI moves the whole module when it loads or unloads it: the engine's kept per-token step (its KV cache
        # and CUDA graph, outside the weights ComfyUI counts) must go with the old placement, or "Unload models"
        # would leave it on the GPU.
        release = getattr(self.engine, "release_step_cache", None)
        if release is not None:
            release()
        return super()._apply(fn, *args, **kwargs)


def make_patcher(module: torch.nn.Module):
    """Registers the module with ComfyUI's memory manager, so "Unload models" frees it and other models get room.

    CoreModelPatcher (dynamic VRAM) where the ComfyUI has it, the classic ModelPatcher everywhere else. The size
    ComfyUI plans VRAM with leaves out what the model keeps on the host (its token-embedding table, 1.56 GB at the
    real size): both patchers use a `size` set before their first load instead of counting the module.
    """
    patcher_cls = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_cls(NextStepManaged(module), load_device=mm.get_torch_device(),
                          offload_device=mm.unet_offload_device())
    host = sum(mm.module_size(getattr(module, name)) for name in getattr(module, "HOST_MODULES", ()))
    if host:
        patcher.size = max(1, mm.module_size(module) - host)
    return patcher


_LAYERS = ("Linear", "Embedding", "LayerNorm", "Conv2d", "GroupNorm")


def operations_for(weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> SimpleNamespace:
    """ComfyUI's layer classes: they skip random init and let the patcher stream weights in low-VRAM mode.

    manual_cast casts stored weights to the compute dtype at forward time; it is only needed when they differ.
    Older ComfyUIs lack some classes (no Embedding before mid-2024); torch.nn stands in for those.
    """
    ops = comfy.ops.disable_weight_init if weight_dtype == compute_dtype else comfy.ops.manual_cast
    return SimpleNamespace(**{name: getattr(ops, name, getattr(torch.nn, name)) for name in _LAYERS})


def default_weight_dtype(device: torch.device) -> torch.dtype:
    """`auto`: on CUDA, bf16 where ComfyUI would use it, else fp32; on CPU and MPS, the engine's rule (`auto_dtype`).

    fp16 is never picked: Qwen-style activations overflow it."""
    if device.type != "cuda":
        return auto_dtype(device)
    try:
        if mm.should_use_bf16(device):
            return torch.bfloat16
    except TypeError:  # very old signature
        pass
    return torch.float32


def load_to_device(managed: Managed, extra_bytes: int = 0) -> torch.device:
    """Asks ComfyUI to place the model on its compute device, freeing others until `extra_bytes` also fit.

    A quantised model that ComfyUI could only load in part (low-VRAM mode keeps the rest in system memory and casts
    it per call) is refused: a quantised layer left behind would be unpacked and dequantised on every call."""
    mm.load_models_gpu([managed.patcher], memory_required=max(0, int(extra_bytes)))
    quant = getattr(managed.module, "quant", None)
    if quant and partially_loaded(managed.patcher):
        size = mm.module_size(managed.module) / 2**30
        raise NextStepError(
            f"this {quant} model ({size:.1f} GB) does not fit in the GPU's free memory, and ComfyUI's low-VRAM mode "
            "(part of the weights in system memory) cannot run quantised NextStep layers. Unload other models, or "
            "use a smaller file: int4 (about 9 GB) fits a 12 GB card, fp8 / int8 (about 15 GB) a 16-24 GB one.")
    return managed.patcher.load_device


def partially_loaded(patcher) -> bool:
    """Whether ComfyUI left part of the model in system memory (`model_lowvram`: on the patcher in the March-2024
    ComfyUI, on its model since)."""
    return bool(getattr(patcher, "model_lowvram", False) or getattr(patcher.model, "model_lowvram", False))


def intermediate_device() -> torch.device:
    return mm.intermediate_device()


def raise_if_cancelled(exc: BaseException) -> None:
    """Turns the engine's cancellation into ComfyUI's interrupt, which the server reports as execution_interrupted."""
    mm.throw_exception_if_processing_interrupted()  # raises and clears the flag when the user interrupted
    raise mm.InterruptProcessingException() from exc


def should_cancel() -> bool:
    return mm.processing_interrupted()


# ---- live preview ---------------------------------------------------------------------------------------------

def _rgb_projection():
    """Latent -> RGB factors for 16-channel f8 latents.

    NextStep's tokenizer is a Flux-architecture f8ch16 autoencoder, so Flux's Latent2RGB factors (made for its
    normalised latents) give an approximate sketch of the image, the same trick ComfyUI's own previews use.
    ComfyUI versions without Flux get None and a plain three-channel view instead.
    """
    import comfy.latent_formats as lf
    flux = getattr(lf, "Flux", None)
    if flux is None:
        return None
    fmt = flux()
    bias = getattr(fmt, "latent_rgb_factors_bias", None)
    return torch.tensor(fmt.latent_rgb_factors), (torch.tensor(bias) if bias is not None else None)


def latent_preview_image(latent: torch.Tensor):
    """One token-space latent [16,h,w] (roughly unit scale) -> a small PIL image."""
    from PIL import Image
    latent = latent.float().cpu()
    proj = _rgb_projection()
    if proj is not None:
        factors, bias = proj
        rgb = torch.einsum("chw,cr->hwr", latent, factors)
        if bias is not None:
            rgb = rgb + bias
        rgb = ((rgb + 1) / 2).clamp(0, 1)
    else:
        rgb = latent[:3].permute(1, 2, 0)
        lo, hi = rgb.amin(), rgb.amax()
        rgb = (rgb - lo) / (hi - lo + 1e-6)
    return Image.fromarray((rgb * 255).round().byte().numpy())


def preview_size() -> int:
    try:
        from comfy.cli_args import args
        return int(getattr(args, "preview_size", 512))
    except Exception:  # a ComfyUI without the flag
        return 512


class TokenProgress:
    """The engine's per-token callback: ComfyUI's progress bar (which also checks for interrupts) plus a preview."""

    def __init__(self, total: int, to_latents):
        self.bar = comfy.utils.ProgressBar(total)
        self.to_latents = to_latents  # partial tokens [B,n,64] -> raw latents [B,16,h,w] (rest zero-filled)
        self.every = max(1, total // PREVIEW_FRAMES)

    def __call__(self, done: int, total: int, tokens: torch.Tensor | None = None) -> None:
        preview = None
        if tokens is not None and (done % self.every == 0 or done == total):
            preview = ("JPEG", latent_preview_image(self.to_latents(tokens[:1])[0]), preview_size())
        self.bar.update_absolute(done, total, preview)
