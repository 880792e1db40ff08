"""NextStep VAE Decode (LATENT -> IMAGE) and NextStep VAE Encode (IMAGE -> LATENT)."""
from __future__ import annotations

from .. import nextstep_core as ns
from . import comfy_glue as glue
from .common import CATEGORY, TOKEN_PIXELS, VAE, NextStepNodeError, image_from_engine, image_to_engine, user_errors


def _check_latent(latent, vae, node: str):
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if samples is None or samples.ndim != 4:
        raise NextStepNodeError(f"{node}: expected a LATENT with 'samples' [B,C,H,W].")
    channels = vae.config.z_channels
    if samples.shape[1] != channels:
        raise NextStepNodeError(
            f"{node}: this LATENT has {samples.shape[1]} channels but the NextStep VAE takes {channels}. It does not "
            "come from a NextStep sampler or VAE (SD latents have 4, Flux/SD3 16 but a different space).")
    return samples


class NextStepVAEDecode:
    TITLE = "NextStep VAE Decode"
    DESCRIPTION = "Decodes NextStep latents into images with the NextStep f8ch16 VAE."
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images [B,H,W,3] in 0..1.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent": ("LATENT", {"tooltip": "Latents from the NextStep Sampler or NextStep VAE Encode."}),
            "vae": (VAE, {"tooltip": "The NextStep VAE (f8ch16 tokenizer)."}),
        }}

    def decode(self, latent, vae):
        with user_errors(self.TITLE):
            samples = _check_latent(latent, vae, self.TITLE)
            glue.load_to_device(vae)
            return (image_from_engine(ns.decode_latents(vae.module, samples)),)


class NextStepVAEEncode:
    TITLE = "NextStep VAE Encode"
    DESCRIPTION = "Encodes images into NextStep latents with the NextStep f8ch16 VAE."
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Latents [B,16,H/8,W/8] in the VAE's raw space.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Images to encode; width and height must be multiples of 8."}),
            "vae": (VAE, {"tooltip": "The NextStep VAE (f8ch16 tokenizer)."}),
        }}

    def encode(self, image, vae):
        with user_errors(self.TITLE):
            pixels = image_to_engine(image)
            down = TOKEN_PIXELS // 2  # the VAE alone downsamples by 8
            h, w = pixels.shape[-2:]
            if h % down or w % down:
                raise NextStepNodeError(f"{self.TITLE}: the image is {w}x{h}; width and height must be "
                                        f"multiples of {down}.")
            glue.load_to_device(vae)
            latents = ns.encode_latents(vae.module, pixels)
            return ({"samples": latents.float().to(glue.intermediate_device())},)


NODE_CLASS_MAPPINGS = {"NextStepVAEDecode": NextStepVAEDecode, "NextStepVAEEncode": NextStepVAEEncode}
