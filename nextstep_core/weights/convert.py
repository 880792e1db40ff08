"""Convert a model (official shard folder or any loadable file) into one `.safetensors` file, streaming.

    python -m nextstep_core convert models/NextStep-1-Large nextstep1_large_int4.safetensors --dtype int4

The output carries everything the loader needs in its metadata: the model config, the tokenizer files, the VAE
config of the model's `vae/` folder (for the latent scale/shift) and the quantisation format. Quantised files
keep a device-neutral layout (`quant.stored_plan`; int4's is described in `quant_int4`); packing for a device's
kernels happens at load. A VAE folder converts to a single VAE file the same way (its config in the metadata).

Tensors are read one at a time with plain file reads (no mmap, so pages of a 5 GB shard are not kept resident),
converted, and written straight into a pre-sized safetensors file: peak RAM is about one source tensor plus its
converted copy, whatever the model size.
"""
from __future__ import annotations

import json
import logging
import os
import struct

import torch

from .config import model_config_from_dict, read_json
from ..errors import CheckpointError
from .identify import AUTO, VAE, kind_of_path
from .loading import (META_CONFIG, META_FORMAT, META_TOKENIZER, META_TOKENIZER_CONFIG, META_VAE_CONFIG,
                      find_vae_for_model, model_source, _vae_files)
from .tokenizer import Tokenizer
from .st_io import FROM_ST, ST_DTYPES, TensorReader
from .quant import QUANT_FORMATS, quantized_tensors, stored_plan

TARGETS = ("bf16", "fp16", "fp32") + QUANT_FORMATS


def _plan(name: str, shape, target: str, kept=None):
    """[(key, dtype, shape)] written for one source tensor (`kept`: its dtype name when it is written unchanged)."""
    if kept:
        return [(name, FROM_ST[kept], shape)]
    quantised = stored_plan(name, shape, target) if target in QUANT_FORMATS else None
    if quantised:
        return quantised
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(target, torch.bfloat16)
    return [(name, dt, shape)]


def _convert_one(name: str, t: torch.Tensor, target: str) -> list[torch.Tensor]:
    quantised = quantized_tensors(name, t, target) if target in QUANT_FORMATS else None
    if quantised:
        return [v for _, v in quantised]
    plan = _plan(name, t.shape, target)
    return [t.to(plan[0][1]) if t.is_floating_point() else t]


def write_streaming(dst: str, items: list, fetch, metadata: dict) -> None:
    """items: [(src_key, [(key, dtype, shape), ...])]; fetch(src_key) -> list of tensors matching the plan."""
    header, offset = {}, 0
    for _, outs in items:
        for key, dtype, shape in outs:
            n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = dst + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for src_key, outs in items:
            tensors = fetch(src_key)
            for (key, dtype, shape), t in zip(outs, tensors):
                t = t.contiguous()
                assert t.dtype == dtype and tuple(t.shape) == tuple(shape), key
                f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del tensors
    os.replace(tmp, dst)


def convert(src: str, dst: str, dtype: str = "bf16", keep_lm_head: bool = False, family: str | None = AUTO) -> str:
    """Write `dst` (one .safetensors) from `src`; returns dst.

    The model's family is resolved here (`family` overrides auto-detection) and written into the file's config with
    its reason, so the file keeps it whatever it is renamed to.
    """
    if dtype not in TARGETS:
        raise CheckpointError(f"unknown target dtype {dtype!r}; use one of {', '.join(TARGETS)}.")
    if not dst.endswith(".safetensors"):
        raise CheckpointError(f"{dst}: the output must be a .safetensors file.")
    src = os.path.abspath(os.path.expanduser(src))
    if os.path.isdir(src) and kind_of_path(src) == VAE:
        return _convert_vae(src, dst, dtype)
    source, raw = model_source(src)
    kept = set()  # keys written as they are: an AutoRound / GPTQ layer's int4 codes, scale and zero
    if source.packed is not None:  # dequantised exactly, except that int4 keeps the codes where the groups map
        kept = source.packed.int4_keys() if dtype == "int4" else set()
        source = source.packed.view(keep_int4=dtype == "int4", marker=False)
        raw = {k: v for k, v in raw.items() if k != "quantization_config"}
    choice = model_config_from_dict(raw, source.path, source.path, family).family_choice
    logging.getLogger("nextstep").log(logging.WARNING if choice.guessed else logging.INFO, "%s: family: %s",
                                      source.path, choice.describe())
    if "nextstep_family" not in raw or family not in (None, AUTO):  # a converted file keeps its recorded reason
        raw = dict(raw, nextstep_family=choice.family, nextstep_family_reason=choice.reason)
    readers = {f: TensorReader(f) for f in source.files}
    keys = [k for k in source.shapes if keep_lm_head or not k.startswith("lm_head.")]
    items = [(k, _plan(k, source.shapes[k], dtype, k in kept and source.dtypes[k])) for k in keys]
    meta = {META_FORMAT: "1", META_CONFIG: json.dumps(raw), "nextstep_kind": "model"}
    if dtype in QUANT_FORMATS:
        meta["nextstep_quant"] = dtype
    if source.kind == "folder":
        tok = Tokenizer.from_folder(src)  # tokenizer.json with any tokens only added_tokens.json names merged in
        meta[META_TOKENIZER] = tok.json
        meta[META_TOKENIZER_CONFIG] = json.dumps(tok.config_dict)
        vae_dir = find_vae_for_model(src)
        if vae_dir:
            meta[META_VAE_CONFIG] = json.dumps(read_json(os.path.join(vae_dir, "config.json")))
    else:
        for k in (META_TOKENIZER, META_TOKENIZER_CONFIG, META_VAE_CONFIG):
            if k in source.metadata:
                meta[k] = source.metadata[k]
    if "nextstep_quant" in source.metadata:
        raise CheckpointError(f"{src} is already quantised; convert from the original bf16/fp32 weights.")
    get = source.reader.get if source.reader else lambda k: readers[source.key_files[k]].get(k)
    write_streaming(dst, items, lambda k: [get(k)] if k in kept else _convert_one(k, get(k), dtype), meta)
    return dst


def _convert_vae(src: str, dst: str, dtype: str) -> str:
    cfg, state, source = _vae_files(src)
    target = dtype if dtype in ("bf16", "fp16") else "fp32"  # a VAE is never quantised: it is small
    if state is None:
        readers = {f: TensorReader(f) for f in source.files}
        get = lambda k: readers[source.key_files[k]].get(k)  # noqa: E731
        names = list(source.shapes)
    else:
        get, names = state.__getitem__, list(state)
    items = [(k, _plan(k, tuple(get(k).shape) if state is not None else source.shapes[k], target)) for k in names]
    meta = {META_FORMAT: "1", META_VAE_CONFIG: json.dumps(cfg.to_json_dict()), "nextstep_kind": "vae"}
    write_streaming(dst, items, lambda k: _convert_one(k, get(k), target), meta)
    return dst
