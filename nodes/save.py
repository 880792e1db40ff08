"""NextStep Save Model: a model written as one file in models/diffusion_models by the engine's streaming converter."""
from __future__ import annotations

import os

import comfy.utils
import folder_paths

from ..nextstep_core.weights.convert import plan_conversion
from . import comfy_glue as glue
from . import files
from .common import CATEGORY, MODEL, NextStepNodeError, user_errors

FORMATS = ["bf16", "fp8", "int8", "int4"]
EXTENSION = ".safetensors"


def file_name(filename: str) -> str:
    """The name inside the diffusion_models folder ('/' for subfolders, .safetensors added); ValueError if it would
    leave that folder."""
    name = str(filename).strip().replace("\\", "/")
    parts = name.split("/")
    if not name or name.startswith("/") or ":" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"filename {filename!r} must be a file name inside models/diffusion_models (subfolders "
                         "with '/'; no '..', no absolute path)")
    return name if name.lower().endswith(EXTENSION) else name + EXTENSION


def _common_length(a: str, b: str) -> int:
    try:
        return len(os.path.commonpath([os.path.realpath(a), os.path.realpath(b)]))
    except ValueError:  # Windows: another drive
        return 0


def save_folder(source: str) -> str:
    """The registered single-file model folder nearest `source` (on its disk, in its models tree), preferring
    existing folders and the name diffusion_models over ComfyUI's legacy unet."""
    folders = [f for name in files._single_file_folders() for f in folder_paths.get_folder_paths(name)]
    existing = [f for f in folders if os.path.isdir(f)] or folders[:1]
    return max(existing, key=lambda f: (_common_length(f, source), os.path.basename(f) == "diffusion_models"))


def forget_listings() -> None:
    """Drops ComfyUI's cached file lists of the single-file folders. It also checks folder mtimes, but where those
    tick in whole seconds a file written in the second of the last listing would stay hidden until a restart."""
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        for name in ("diffusion_models", "unet"):
            cache.pop(name, None)


class NextStepSaveModel:
    TITLE = "NextStep Save Model"
    DESCRIPTION = ("Writes a NextStep model as one .safetensors file in models/diffusion_models, in bf16, fp8, int8 "
                   "or int4, with the same streaming converter as `python -m nextstep_core convert`. NextStep Model "
                   "Loader lists the file as soon as it is written (refresh the page's node definitions with R).")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("model_name",)
    OUTPUT_TOOLTIPS = ("The new file's name, as NextStep Model Loader lists it.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (files.model_choices(), {"tooltip": "The model to convert when no model is connected: a "
                                                              "folder under models/nextstep or a single file. The "
                                                              "original bf16/fp32 weights; a quantised file cannot be "
                                                              "converted again."}),
            "filename": ("STRING", {"default": "nextstep_int8", "tooltip": "Name of the new file in "
                                    "models/diffusion_models (.safetensors is added; subfolders with '/')."}),
            "dtype": (FORMATS, {"default": "int8", "tooltip": "Weight format of the file. bf16: half of the fp32 "
                                "release; fp8 / int8: about a quarter (int8 is the more accurate); int4: decoder in "
                                "4 bits, about 0.16 of fp32, least accurate."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace a file of that name. Off: an existing "
                                      "file stops the node before any work."}),
        }, "optional": {
            "model": (MODEL, {"tooltip": "A model from NextStep Model Loader: the file or folder it was loaded from is "
                                         "converted (model_name is then ignored)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, filename=None):
        if filename is None:  # linked from another node: checked when it runs
            return True
        try:
            file_name(filename)
        except ValueError as e:
            return str(e)
        return True

    def save(self, model_name, filename, dtype, overwrite, model=None):
        with user_errors(self.TITLE):
            try:
                name = file_name(filename)
            except ValueError as e:
                raise NextStepNodeError(f"{self.TITLE}: {e}") from None
            source = model.path if model is not None else files.resolve(model_name, "model", download=False)
            dst = os.path.join(save_folder(source), *name.split("/"))
            if os.path.lexists(dst) and not overwrite:
                raise NextStepNodeError(f"{self.TITLE}: {dst} already exists; choose another filename, or set "
                                        "overwrite to true to replace it.")
            job = plan_conversion(source, dst, dtype)  # refuses its own source, a quantised one, a full disk
            bar = comfy.utils.ProgressBar(len(job.items))
            job.run(progress=lambda done, total: bar.update_absolute(done, total), should_cancel=glue.should_cancel)
            forget_listings()
            return {"ui": {"text": [name]}, "result": (name,)}


NODE_CLASS_MAPPINGS = {"NextStepSaveModel": NextStepSaveModel}
