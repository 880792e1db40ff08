"""NextStep Sampler: the autoregressive loop, one image token at a time, each drawn by the flow-matching head."""
from __future__ import annotations

from .. import nextstep_core as ns
from . import comfy_glue as glue
from .common import CATEGORY, CONDITIONING, MAX_SIDE, MODEL, TOKEN_PIXELS, check_size, user_errors
from .keep import LATENT_TOOLTIP, sampler_init


class NextStepSampler:
    TITLE = "NextStep Sampler"
    DESCRIPTION = ("Generates images token by token (16x16 pixels each, in rows) with a NextStep model and returns "
                   "their latents in the VAE's own space; decode them with NextStep VAE Decode.")
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Latents [batch, 16, height/8, width/8] in the raw space of NextStep's f8ch16 VAE.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "The NextStep model from NextStep Model Loader."}),
            "conditioning": (CONDITIONING, {"tooltip": "From NextStep Text Encode, or NextStep Edit Encode to edit."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Seed of the head's noise; the same seed and settings give the same image."}),
            "width": ("INT", {"default": 512, "min": TOKEN_PIXELS, "max": MAX_SIDE, "step": TOKEN_PIXELS,
                              "tooltip": f"Image width in pixels, a multiple of {TOKEN_PIXELS}."}),
            "height": ("INT", {"default": 512, "min": TOKEN_PIXELS, "max": MAX_SIDE, "step": TOKEN_PIXELS,
                               "tooltip": f"Image height in pixels, a multiple of {TOKEN_PIXELS}."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "Images per prompt, generated together (memory grows with it)."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Text guidance scale; 1 turns classifier-free guidance off."}),
            "cfg_img": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Image guidance when editing (2.0 for NextStep-1-Large-Edit); 1 = off."}),
            "cfg_schedule": (list(ns.CFG_SCHEDULES), {"default": "constant",
                             "tooltip": "How guidance changes over the tokens: constant, or linear "
                                        "(NextStep-1: decays from cfg towards 1; NextStep-1.1: rises from cfg/2)."}),
            "timesteps_shift": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1, "round": 0.01,
                                "tooltip": "Shifts the head's time grid toward noise; 1.0 for text-to-image, "
                                           "3.2 for editing."}),
            "steps": ("INT", {"default": 28, "min": 1, "max": 200,
                              "tooltip": "Flow-matching head steps per token (the main speed knob; 20-50)."}),
            "sampler": (["auto", *ns.SAMPLERS], {"default": "auto",
                        "tooltip": "The flow-matching head's sampler. auto: the model family's reference sampler "
                                   "(euler_maruyama for NextStep-1, flow_sde for 1.1); euler is deterministic."}),
            "use_norm": ("BOOLEAN", {"default": True,
                                     "tooltip": "Layer-normalize each sampled token: on in NextStep-1's examples, "
                                                "off in NextStep-1.1's."}),
        }, "optional": {
            "steps_end": ("INT", {"default": 0, "min": 0, "max": 200,
                                  "tooltip": "Step annealing: head steps fall linearly from 'steps' at the first token "
                                             "to this at the last (50 -> 5 took 0.70x the time of 50 in the CPU benchmark; on "
                                             "NVIDIA GPUs it runs on CUDA graphs too). 0 = off."}),
            "latent": ("LATENT", {"tooltip": LATENT_TOOLTIP}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Variation strength, with a latent: 1 generates the image anew; lower "
                                             "values start each token part-way from the latent's own token, so the "
                                             "result stays closer to it (0.5: half of the head's steps; 0: the latent "
                                             "as it is). Tokens its noise_mask keeps (0) stay exact at any strength."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None):
        # Listing an input here makes ComfyUI skip its own range check for it, so this checks the range too.
        for name, value in (("width", width), ("height", height)):
            problem = check_size(name, value)
            if problem:
                return problem
        return True

    def sample(self, model, conditioning, seed, width, height, batch_size, cfg, cfg_img, cfg_schedule,
               timesteps_shift, steps, sampler, use_norm, steps_end=0, latent=None, denoise=1.0):
        with user_errors(self.TITLE):
            settings = ns.SamplerSettings(width=width, height=height, images_per_prompt=batch_size, cfg=cfg,
                                          cfg_img=cfg_img, cfg_schedule=cfg_schedule,
                                          timesteps_shift=timesteps_shift, steps=steps, steps_end=steps_end or None,
                                          sampler=None if sampler == "auto" else sampler, use_norm=use_norm,
                                          seed=seed, denoise=denoise).validate(model.config)
            n_img = len(conditioning.prompts) * batch_size
            init = sampler_init(latent, model.module, n_img, width, height, self.TITLE)
            rows = ns.guidance_branches(conditioning, cfg, cfg_img) * len(conditioning.prompts) * batch_size
            need = ns.estimate_memory_bytes(model.module, width, height, rows, steps=steps)  # weights, cache, activations
            glue.load_to_device(model, need - glue.mm.module_size(model.module))
            # Previews stay in the model's token space (unit scale, like the normalised latents the RGB factors
            # expect); only the returned LATENT is converted to the VAE's raw space.
            progress = glue.TokenProgress((width // TOKEN_PIXELS) * (height // TOKEN_PIXELS),
                                          lambda tokens: ns.tokens_to_latents(tokens, width, height, model.config))
            result = ns.sample(model.module, conditioning, settings, progress=progress,
                               should_cancel=glue.should_cancel, init=init)
            return ({"samples": result.latents.float().to(glue.intermediate_device())},)


NODE_CLASS_MAPPINGS = {"NextStepSampler": NextStepSampler}
