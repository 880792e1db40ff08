"""The pack's ComfyUI nodes: the only code here that imports comfy.*, folder_paths or server."""
from . import conditioning, keep, latents, loaders, sampler, save

NODE_CLASS_MAPPINGS = {}
for _module in (loaders, conditioning, sampler, latents, keep, save):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
# every node class names itself once, in TITLE; user_errors(...) reads the same attribute
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.TITLE for key, cls in NODE_CLASS_MAPPINGS.items()}
