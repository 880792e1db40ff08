"""The VAE's files (the f8ch16 tokenizer): a folder with `config.json` + `checkpoint.pt` (or `*.safetensors`), a `.pt`
inside such a folder, or one `.safetensors` file with the config in its metadata (written by `convert`).

`checkpoint.pt` is read with `torch.load(weights_only=True)`: a file holding anything besides tensors is refused,
never unpickled. Everything else streams tensor by tensor as the model's weights do (`loading.stream_into`).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re

import torch

from ..errors import CheckpointError
from ..fs import fs_error, is_file, list_folder
from .config import read_json, vae_config_from_dict
from .identify import MODEL, VAE, kind_of_config, kind_of_safetensors, wrong_kind
from .loading import (META_VAE_CONFIG, Source, check_dtype_supported, check_keys, expected_shapes, parse_dtype,
                      scan_safetensors, set_tensor, stream_into)

log = logging.getLogger("nextstep")


def load_vae(path: str, dtype="float32", device=None, operations=None):
    """Load the f8ch16 tokenizer (see module docstring for accepted layouts)."""
    from ..model.vae import AutoEncoder

    dtype, device = parse_dtype(dtype), torch.device(device or "cpu")
    check_dtype_supported(dtype, device)
    path = os.path.abspath(os.path.expanduser(path))
    cfg, state, src = vae_files(path)
    with torch.device("meta"):
        vae = AutoEncoder(cfg, operations)
    expected = expected_shapes(vae)
    if state is not None:  # checkpoint.pt: already in memory
        src = Source(path, "folder", {k: path for k in state}, {k: tuple(v.shape) for k, v in state.items()}, {})
    if "decoder.conv_in.weight" in src.shapes and src.shapes["decoder.conv_in.weight"][1] != cfg.z_channels:
        raise CheckpointError(f"{path}: the decoder takes {src.shapes['decoder.conv_in.weight'][1]} latent channels "
                              f"but config.json says z_channels = {cfg.z_channels}; NextStep needs the 16-channel "
                              "f8ch16 tokenizer with its own config.json.")
    unexpected = check_keys(expected, src, "VAE")
    if unexpected:
        log.warning("%s: %d unexpected VAE tensor(s) not loaded: %s", path, len(unexpected), unexpected[:5])
    if state is not None:
        for k in expected:
            t = state[k]
            set_tensor(vae, k, (t.to(dtype) if t.is_floating_point() else t).to(device))
    else:
        stream_into(vae, src, list(expected), dtype, device)
    vae.unexpected_keys = unexpected
    vae.source_path = path
    return vae.eval().requires_grad_(False)


def vae_files(path: str):
    """(config, in-memory state or None, Source or None) for a VAE path."""
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not is_file(cfg_path, CheckpointError):
            raise CheckpointError(f"{path}: no config.json. A NextStep VAE folder holds config.json + checkpoint.pt.")
        raw = read_json(cfg_path)
        if kind_of_config(raw) == MODEL:
            raise wrong_kind(path, VAE, MODEL)
        cfg = vae_config_from_dict(raw, cfg_path)
        pt = os.path.join(path, "checkpoint.pt")
        sts = sorted(os.path.join(path, f) for f in list_folder(path, CheckpointError) if f.endswith(".safetensors"))
        if sts:
            return cfg, None, scan_safetensors(sts, path, "folder")
        if is_file(pt, CheckpointError):
            return cfg, torch_load_state(pt), None
        raise CheckpointError(f"{path}: no checkpoint.pt or .safetensors weights next to config.json.")
    if os.path.isfile(path) and path.endswith(".pt"):
        return vae_files(os.path.dirname(path))
    if os.path.isfile(path) and path.endswith((".safetensors", ".sft")):
        src = scan_safetensors([path], path, "file")
        if kind_of_safetensors(src.metadata, src.shapes) == MODEL:
            raise wrong_kind(path, VAE, MODEL)
        if META_VAE_CONFIG in src.metadata:
            return vae_config_from_dict(json.loads(src.metadata[META_VAE_CONFIG]), path), None, src
        beside = os.path.join(os.path.dirname(path), "config.json")
        if is_file(beside, CheckpointError):
            return vae_config_from_dict(read_json(beside), beside), None, src
        raise CheckpointError(f"{path} has no VAE config (neither in its metadata nor a config.json beside it). "
                              "Use the f8ch16 tokenizer folder, or a file written by `python -m nextstep_core convert`.")
    is_file(path, CheckpointError)  # a fault on the path (permission, a link loop) is named as itself
    raise CheckpointError(f"{path} does not exist or is not a VAE folder/file.")


def torch_load_state(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # PyTorch's own text suggests weights_only=False: running the file's code
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" (it names {found.group(1)})" if found else ""
        raise CheckpointError(f"{path} holds Python objects besides tensors{what}, which are never loaded here "
                              "because unpickling them can run code. Download the file again from the official "
                              "repository; for a checkpoint of your own, save only its state_dict of tensors, or "
                              "save it as .safetensors.") from None
    except Exception as e:
        if isinstance(e, OSError) and e.errno is not None:  # the file system's fault, not the file's contents
            raise fs_error("read", path, e, CheckpointError) from None
        raise CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0]}); it is truncated, corrupt or not a "
                              "weights-only checkpoint. Download it again.") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a flat state dict of tensors.")
    return state
