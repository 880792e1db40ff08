"""NextStep-1 / 1.1 inference in plain PyTorch: load the official checkpoints, generate and edit images.

    import nextstep_core as ns
    model = ns.load_model("models/nextstep/NextStep-1-Large", dtype="bfloat16", device=device)  # any torch device
    vae = ns.load_vae(ns.find_vae_for_model(model.source_path) or "models/nextstep/NextStep-1-f8ch16-Tokenizer")
    out = ns.generate(model, vae, ["a red fox in the snow"], ns.family_defaults(model.config.family).replace(seed=42))
    out.pil()[0].save("fox.png")

This package never imports ComfyUI; the node pack next to it is a thin face over these functions.
"""
from .errors import CheckpointError, GenerationCancelled, NextStepError

# Everything else is imported on first use (PEP 562), so that `python -m nextstep_core` reaches its own Ctrl-C
# handler before torch is imported, and `--help` needs no torch. One row per module: the names it gives.
_LAZY = {
    "weights.config": ("FAMILIES", "FAMILY_V1", "FAMILY_V1_1", "ModelConfig", "VAEConfig"),
    "model.family": ("Family", "family_of"),
    "generation.loop": ("Conditioning", "SampleResult", "guidance_branches", "sample", "tokens_to_latents"),
    "generation.keep": ("TokenInit", "keep_from_mask", "keep_from_noise_mask", "keep_rows"),
    "frontend.images": ("decode_latents", "encode_edit_images", "encode_latents", "read_image"),
    "generation.memory": ("estimate_memory_bytes",),
    "weights.loading": ("find_vae_for_model", "load_model"),
    "weights.vae_files": ("load_vae",),
    "model.decoder": ("NextStep",),
    "frontend.pipeline": ("GenerationResult", "generate"),
    "generation.settings": ("CFG_SCHEDULES", "FAST_MODES", "MAX_SIDE", "NOISE_MODES", "SAMPLERS", "SamplerSettings",
                 "default_prompts", "family_defaults"),
    "frontend.devices": ("resolve_device",),
    "model.vae": ("AutoEncoder",),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


__all__ = sorted(["CheckpointError", "GenerationCancelled", "NextStepError", *_WHERE])
__version__ = "0.1.0"
