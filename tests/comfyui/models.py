"""Tiny random NextStep checkpoints laid out as a user's ComfyUI models/ folder.

They sit under the names the shipped workflows use (models/nextstep/NextStep-1.1 with vae/, and
NextStep-1-Large-Edit), so the workflows run unmodified apart from sizes and step counts.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from nextstep_core.weights import testing
from nextstep_core.weights.convert import convert

T2I_MODEL = "NextStep-1.1"
EDIT_MODEL = "NextStep-1-Large-Edit"
SINGLE_FILE = "nextstep_tiny.safetensors"
SINGLE_FILE_FP8 = "nextstep_tiny_fp8.safetensors"


def build_models_dir(root: Path) -> Path:
    nextstep = root / "nextstep"
    testing.make_tiny_checkpoint(str(nextstep / T2I_MODEL), size="tiny", seed=0, family="nextstep-1.1")
    testing.make_tiny_checkpoint(str(nextstep / EDIT_MODEL), size="tiny", seed=1, family="nextstep-1")
    (root / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (root / "vae").mkdir(parents=True, exist_ok=True)
    convert(str(nextstep / T2I_MODEL), str(root / "diffusion_models" / SINGLE_FILE), dtype="fp32")
    convert(str(nextstep / T2I_MODEL), str(root / "diffusion_models" / SINGLE_FILE_FP8), dtype="fp8")
    return root


def write_full_size_vae(root: Path) -> tuple[str, str]:
    """A random VAE at the real tokenizer's geometry (what ComfyUI's own VAE loader can recognise).

    Returns (folder name under models/nextstep, file name under models/vae): the same weights, as the official
    folder (config.json + checkpoint.pt) for the pack's loader and as a bare checkpoint file for core's Load VAE.
    """
    folder = root / "nextstep" / "full-size-vae"
    if not (root / "vae" / "nextstep_f8ch16_random.pt").is_file():  # shared by the servers of one session
        testing.write_vae(str(folder), seed=3, size="full")
        shutil.copyfile(folder / "checkpoint.pt", root / "vae" / "nextstep_f8ch16_random.pt")
    return "full-size-vae", "nextstep_f8ch16_random.pt"
