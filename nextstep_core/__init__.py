"""NextStep-1 / 1.1 inference in plain PyTorch: load the official checkpoints, generate and edit images.

    import nextstep_core as ns
    model = ns.load_model("models/nextstep/NextStep-1-Large", dtype="bfloat16", device=device)  # any torch device
    vae = ns.load_vae(ns.find_vae_for_model(model.source_path) or "models/nextstep/NextStep-1-f8ch16-Tokenizer")
    out = ns.generate(model, vae, ["a red fox in the snow"], ns.family_defaults(model.config.family).replace(seed=42))
    out.pil()[0].save("fox.png")

This package never imports ComfyUI; the node pack next to it is a thin face over these functions.
"""
from .config import FAMILIES, FAMILY_V1, FAMILY_V1_1, ModelConfig, VAEConfig
from .errors import CheckpointError, GenerationCancelled, NextStepError
from .family import Family, family_of
from .generation import Conditioning, SampleResult, guidance_branches, sample, tokens_to_latents
from .keep import TokenInit, keep_from_mask, keep_from_noise_mask, keep_rows
from .images import decode_latents, encode_edit_images, encode_latents
from .memory import estimate_memory_bytes
from .loading import find_vae_for_model, load_model, load_vae
from .model import NextStep
from .pipeline import GenerationResult, generate
from .settings import (CFG_SCHEDULES, FAST_MODES, MAX_SIDE, NOISE_MODES, SAMPLERS, SamplerSettings, default_prompts,
                       family_defaults)
from .vae import AutoEncoder

__all__ = [
    "AutoEncoder", "CFG_SCHEDULES", "CheckpointError", "Conditioning", "FAMILIES", "FAMILY_V1", "FAMILY_V1_1",
    "FAST_MODES", "Family", "GenerationCancelled", "GenerationResult", "MAX_SIDE", "ModelConfig", "NOISE_MODES",
    "NextStep", "NextStepError", "SAMPLERS", "SampleResult", "SamplerSettings", "TokenInit", "VAEConfig",
    "decode_latents", "default_prompts", "encode_edit_images", "encode_latents", "estimate_memory_bytes",
    "family_defaults", "family_of", "find_vae_for_model", "generate", "guidance_branches", "keep_from_mask",
    "keep_from_noise_mask", "keep_rows", "load_model", "load_vae", "sample", "tokens_to_latents",
]
__version__ = "0.1.0"
