"""The pack's ComfyUI nodes: the only code here that imports comfy.*, folder_paths or server."""
from . import conditioning, keep, latents, loaders, sampler

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (loaders, conditioning, sampler, latents, keep):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
