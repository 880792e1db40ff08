"""NextStep Text Encode and NextStep Edit Encode."""
from __future__ import annotations

from .. import nextstep_core as ns
from . import comfy_glue as glue
from .common import CATEGORY, CONDITIONING, TOKEN_PIXELS, VAE, image_to_engine, user_errors


class NextStepTextEncode:
    TITLE = "NextStep Text Encode"
    DESCRIPTION = ("The prompt for the NextStep sampler. NextStep reads text with its own language model, so no "
                   "CLIP is involved; tokenizing happens in the sampler with the model's tokenizer.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Prompt, positive and negative prompt for the NextStep Sampler (or the Edit Encode node).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "What to draw. For the edit model, the instruction (e.g. 'Add a hat')."}),
            "positive_prompt": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "Appended to the prompt (quality words); empty for none."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "What to steer away from (the unconditional branch of CFG). "
                                                      "For editing, 'Copy original image.' is the reference value."}),
        }}

    def encode(self, prompt, positive_prompt, negative_prompt):
        with user_errors(self.TITLE):
            return (ns.Conditioning(prompts=[prompt], positive_prompt=positive_prompt,
                                    negative_prompt=negative_prompt),)


class NextStepEditEncode:
    TITLE = "NextStep Edit Encode"
    DESCRIPTION = ("Adds the image to edit to a NextStep conditioning, for the NextStep-1-Large-Edit model. The "
                   "image is encoded with the NextStep VAE; its size should match the sampler's width and height.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = (CONDITIONING,)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The conditioning with the input image attached; feed it to the NextStep Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": (CONDITIONING, {"tooltip": "The edit instruction from NextStep Text Encode."}),
            "vae": (VAE, {"tooltip": "The NextStep VAE (f8ch16 tokenizer) that encodes the input image."}),
            "image": ("IMAGE", {"tooltip": f"The image to edit; width and height must be multiples of {TOKEN_PIXELS}. "
                                           "One image, or one per prompt."}),
        }}

    def encode(self, conditioning, vae, image):
        with user_errors(self.TITLE):
            glue.load_to_device(vae)
            return (ns.encode_edit_images(vae.module, conditioning, image_to_engine(image)),)


NODE_CLASS_MAPPINGS = {"NextStepTextEncode": NextStepTextEncode, "NextStepEditEncode": NextStepEditEncode}
