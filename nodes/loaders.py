"""NextStep Model Loader and NextStep VAE Loader."""
from __future__ import annotations

import importlib.util

import torch

from .. import nextstep_core as ns
from . import comfy_glue as glue
from . import files
from .common import CATEGORY, MODEL, VAE, user_errors

WEIGHT_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 "fp8": None, "int8": None, "int4": None}
QUANTISED = ("fp8", "int8", "int4")  # weights stored quantised, computed in bf16 (or fp32 where bf16 is unavailable)
ATTENTION = {"sdpa": "sdpa", "flash-attn": "flash"}  # combo value -> engine backend name
FAMILIES = ["auto", *ns.FAMILIES]
_FAMILY_TIP = ("NextStep-1 or NextStep-1.1: picks the sampler, time grid and guidance schedule the model was made for. "
               "auto: the family recorded in the file, else the published name (NextStep-1.1..., NextStep-1-Large...) "
               "of the folder or of the repo it was downloaded from, else nextstep-1 with a warning in the log. Set it "
               "when the folder was renamed and the log says the family was a guess.")
_DOWNLOAD_TIP = ("When the selected checkpoint is one of the published ones and is not on disk yet, download it "
                 "from Hugging Face into models/nextstep/<name> (tens of GB for a model). Off: say where to put it.")


class NextStepModelLoader:
    TITLE = "NextStep Model Loader"
    DESCRIPTION = ("Loads a NextStep-1 / 1.1 model: a folder with config.json under models/nextstep (the official "
                   "Hugging Face layout), or a single .safetensors file in models/diffusion_models.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The NextStep model, managed by ComfyUI's memory manager (\"Unload models\" frees it).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (files.model_choices(), {"tooltip": "Model folder under models/nextstep (with config.json),"
                                                              " or a single .safetensors in models/diffusion_models."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "auto", "tooltip": "Weight precision. auto: bf16 where "
                             "the device computes bf16 natively (CUDA from Ampere, Apple GPUs that do, CPUs with "
                             "AVX512-BF16 / AMX), else fp32; quantised files (convert, AutoRound) stay quantised. fp8 "
                             "/ int8 quantise while loading: about half the memory of bf16 (fp8 the decoder, on "
                             "Ada / Hopper tensor cores; int8 the head's blocks too); int4 the decoder: about 0.3x. "
                             "fp16 may overflow on this model family."}),
            "attention": (list(ATTENTION), {"default": "sdpa", "tooltip": "Attention kernel. sdpa is PyTorch's "
                          "built-in; flash-attn needs the flash_attn package and a CUDA GPU."}),
            "download": ("BOOLEAN", {"default": False, "tooltip": _DOWNLOAD_TIP}),
        }, "optional": {  # optional, so that workflows saved before it existed still run (as auto)
            "family": (FAMILIES, {"default": "auto", "tooltip": _FAMILY_TIP}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, attention=None):
        if attention == "flash-attn" and importlib.util.find_spec("flash_attn") is None:
            return "attention 'flash-attn' needs the flash_attn package (pip install flash-attn); use 'sdpa' instead."
        if attention is not None and attention not in ATTENTION:
            return f"attention must be one of {list(ATTENTION)}, got {attention!r}"
        return True

    def load(self, model_name, weight_dtype, attention, download, family="auto"):
        with user_errors(self.TITLE):
            path = files.resolve(model_name, "model", download)
            dtype = WEIGHT_DTYPES[weight_dtype] or glue.default_weight_dtype(glue.mm.get_torch_device())
            model = ns.load_model(path, dtype=dtype, device=glue.mm.unet_offload_device(),
                                  operations=glue.operations_for(dtype, dtype), attn_backend=ATTENTION[attention],
                                  quantize=weight_dtype if weight_dtype in QUANTISED else None, family=family,
                                  target_device=glue.mm.get_torch_device())  # quantised weights packed once, there
            return (glue.Managed(model, glue.make_patcher(model), path),)


class NextStepVAELoader:
    TITLE = "NextStep VAE Loader"
    DESCRIPTION = ("Loads NextStep's f8ch16 image tokenizer (the VAE): a model's vae/ folder, the "
                   "NextStep-1-f8ch16-Tokenizer folder, or a file in models/vae.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The NextStep VAE, for decoding the sampler's LATENT and encoding images to edit.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (files.vae_choices(), {"tooltip": "A VAE folder (config.json + checkpoint.pt) under "
                                                          "models/nextstep, or a file in models/vae."}),
            "download": ("BOOLEAN", {"default": False, "tooltip": _DOWNLOAD_TIP}),
        }}

    def load(self, vae_name, download):
        with user_errors(self.TITLE):
            path = files.resolve(vae_name, "vae", download)
            # fp32: the VAE is small (~330 MB) and its decoder is sensitive to reduced precision.
            vae = ns.load_vae(path, dtype=torch.float32, device=glue.mm.unet_offload_device(),
                              operations=glue.operations_for(torch.float32, torch.float32))
            return (glue.Managed(vae, glue.make_patcher(vae), path),)


NODE_CLASS_MAPPINGS = {"NextStepModelLoader": NextStepModelLoader, "NextStepVAELoader": NextStepVAELoader}