"""Convert a model (official shard folder or any loadable file) into one `.safetensors` file, streaming.

    python -m nextstep_core convert models/NextStep-1-Large nextstep1_large_int4.safetensors --dtype int4
    job = plan_conversion(src, dst, "int8")      # every refusal happens here; job.size is the file's size
    job.run(progress=lambda done, total: ..., should_cancel=lambda: False)

The output carries everything the loader needs in its metadata: the model config, the tokenizer files, the VAE
config of the model's `vae/` folder (for the latent scale/shift) and the quantisation format. Quantised files
keep a device-neutral layout (`quant.stored_plan`; int4's is described in `quant_int4`); packing for a device's
kernels happens at load. A VAE folder converts to a single VAE file the same way (its config in the metadata).

Tensors are read one at a time with plain file reads (no mmap, so pages of a 5 GB shard are not kept resident),
converted, and written straight into a pre-sized safetensors file: peak RAM is about one source tensor plus its
converted copy, whatever the model size.

Safety: `plan_conversion` reads only configs and headers, and refuses before any weight is read: an output that is
one of the source's files or lies inside its folder, an output that is a folder, has another extension or whose
folder cannot take it, a disk without room for it, an already quantised source, a tensor dtype it cannot convert.
`run` writes through `fs.write_atomic`: a temporary file of its own beside the output, renamed over it only when
complete, removed on any failure (disk full, Ctrl-C, SIGTERM where the front end raises on it, a cancel). Two
conversions to one output therefore leave one whole file, the one renamed last, whose header matches its data.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import CheckpointError, GenerationCancelled
from ..fs import check_writable, write_atomic
from .config import model_config_from_dict, read_json
from .identify import AUTO, VAE, kind_of_path
from .loading import (META_CONFIG, META_FORMAT, META_TOKENIZER, META_TOKENIZER_CONFIG, META_VAE_CONFIG,
                      find_vae_for_model, model_source)
from .quant import QUANT_FORMATS, quantized_tensors, stored_plan
from .vae_files import vae_files
from .st_io import FROM_ST, ST_DTYPES, TensorReader, unsupported_dtype
from .tokenizer import Tokenizer

TARGETS = ("bf16", "fp16", "fp32") + QUANT_FORMATS
_FLOAT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # quantised files: bf16 elsewhere


@dataclass
class Conversion:
    """A conversion every check has passed; nothing is written until `run`."""
    src: str
    dst: str
    dtype: str
    items: list  # [(source key, [(key, dtype, shape), ...])] in file order
    fetch: Callable  # source key -> its converted tensors, in the order of its plan
    header: bytes  # length field + JSON header (padded to 8 bytes)

    @property
    def size(self) -> int:
        """Bytes of the finished file."""
        return len(self.header) + sum(_nbytes(dt, shape) for _, outs in self.items for _, dt, shape in outs)

    def run(self, progress=None, should_cancel=None) -> str:
        """Writes `dst`; `progress(done, total)` after each source tensor, `should_cancel()` before each (True:
        raises GenerationCancelled and leaves no file). Returns dst."""
        total = len(self.items)

        def body(f):
            f.write(self.header)
            for done, (src_key, outs) in enumerate(self.items):
                if should_cancel is not None and should_cancel():
                    raise GenerationCancelled(f"conversion cancelled after {done} of {total} tensors")
                for (key, dtype, shape), t in zip(outs, self.fetch(src_key)):
                    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                        raise RuntimeError(f"{key}: converted to {t.dtype} {list(t.shape)}, planned {dtype} {shape}")
                    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                if progress is not None:
                    progress(done + 1, total)

        write_atomic(self.dst, body)
        return self.dst


def _nbytes(dtype: torch.dtype, shape) -> int:
    return int(torch.Size(shape).numel()) * dtype.itemsize


def _plan(path: str, name: str, shape, stored: str, target: str, keep: bool = False) -> list:
    """[(key, dtype, shape)] written for one source tensor stored as `stored` (a safetensors dtype name); `keep`:
    written as it is."""
    dtype = FROM_ST.get(stored)
    if dtype is None:
        raise unsupported_dtype(path, name, stored)
    if keep or not dtype.is_floating_point:  # ids, masks, a packed folder's int4 codes: kept as they are
        return [(name, dtype, tuple(shape))]
    quantised = stored_plan(name, shape, target) if target in QUANT_FORMATS else None
    return quantised or [(name, _FLOAT.get(target, torch.bfloat16), tuple(shape))]


def _convert_one(name: str, t: torch.Tensor, target: str) -> list[torch.Tensor]:
    """The tensors `_plan` promised for `t`."""
    if not t.is_floating_point():
        return [t]
    quantised = quantized_tensors(name, t, target) if target in QUANT_FORMATS else None
    if quantised:
        return [v for _, v in quantised]
    return [t.to(_FLOAT.get(target, torch.bfloat16))]


def _check_output(dst: str) -> tuple[str, str]:
    """(absolute dst, the existing folder it will be created from): the output checked before anything is read."""
    dst = os.path.abspath(os.path.expanduser(dst))
    if not dst.endswith(".safetensors"):
        raise CheckpointError(f"{dst}: the output must be a .safetensors file.")
    if os.path.isdir(dst):
        raise CheckpointError(f"{dst} is a folder; give a file name inside it (ending in .safetensors).")
    return dst, check_writable(os.path.dirname(dst), "convert: ")


def _check_not_source(dst: str, src: str, files) -> None:
    """Refuses an output that would overwrite a file of the source, or land in its folder (where the loader would
    take it for one more shard of the model it was made from)."""
    real = os.path.realpath(dst)
    if os.path.isdir(src) and _inside(real, os.path.realpath(src)):
        raise CheckpointError(f"{dst} is inside the folder being converted ({src}), where it would become part of "
                              "the model it is made from; write it to another folder, e.g. models/diffusion_models.")
    for f in files:
        if real == os.path.realpath(f) or (os.path.exists(dst) and os.path.samefile(dst, f)):
            raise CheckpointError(f"{dst} is the source file {f}: converting would overwrite the weights it reads; "
                                  "choose another output file.")


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # Windows: another drive
        return False


def _job(src: str, dst: str, base: str, dtype: str, items: list, fetch, metadata: dict) -> Conversion:
    header = {key: {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": [0, 0]}
              for _, outs in items for key, dt, shape in outs}
    offset = 0
    for _, outs in items:
        for key, dt, shape in outs:
            header[key]["data_offsets"] = [offset, offset + _nbytes(dt, shape)]
            offset += _nbytes(dt, shape)
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    job = Conversion(src, dst, dtype, items, fetch, struct.pack("<Q", len(blob)) + blob)
    free = shutil.disk_usage(base).free
    if job.size > free:
        raise CheckpointError(f"{dst} needs {job.size / 2**30:.2f} GiB but {base} has only {free / 2**30:.2f} GiB "
                              "free; free some space or choose another disk.")
    return job


def _lazy_get(key_files: dict):
    """source key -> tensor, each file opened on first use (nothing is read while planning)."""
    readers = {}

    def get(key: str) -> torch.Tensor:
        path = key_files[key]
        if path not in readers:
            readers[path] = TensorReader(path)
        return readers[path].get(key)
    return get


def plan_conversion(src: str, dst: str, dtype: str = "bf16", keep_lm_head: bool = False,
                    family: str | None = AUTO) -> Conversion:
    """Every check of a conversion of `src` into `dst` (see the module docstring), reading no weight.

    The model's family is resolved here (`family` overrides auto-detection) and written into the file's config with
    its reason, so the file keeps it whatever it is renamed to.
    """
    if dtype not in TARGETS:
        raise CheckpointError(f"unknown target dtype {dtype!r}; use one of {', '.join(TARGETS)}.")
    dst, base = _check_output(dst)
    src = os.path.abspath(os.path.expanduser(src))
    if os.path.isdir(src) and kind_of_path(src) == VAE:
        return _plan_vae(src, dst, base, dtype)
    source, raw = model_source(src)
    _check_not_source(dst, source.path, source.files)
    kept = set()  # keys written as they are: an AutoRound / GPTQ layer's int4 codes, scale and zero
    if source.packed is not None:  # dequantised exactly, except that int4 keeps the codes where the groups map
        kept = source.packed.int4_keys() if dtype == "int4" else set()
        source = source.packed.view(keep_int4=dtype == "int4", marker=False)
        raw = {k: v for k, v in raw.items() if k != "quantization_config"}
    quant = source.metadata.get("nextstep_quant")
    if quant == dtype:
        raise CheckpointError(f"{src} is already an {quant} file: load it as it is, there is nothing to convert.")
    if quant:
        raise CheckpointError(f"{src} is already quantised as {quant}, so it cannot become {dtype}: convert from the "
                              "original bf16/fp32 weights (the model folder).")
    keys = [k for k in source.shapes if keep_lm_head or not k.startswith("lm_head.")]
    items = [(k, _plan(source.key_files[k], k, source.shapes[k], source.dtypes[k], dtype, k in kept)) for k in keys]
    choice = model_config_from_dict(raw, source.path, source.path, family).family_choice
    logging.getLogger("nextstep").log(logging.WARNING if choice.guessed else logging.INFO, "%s: family: %s",
                                      source.path, choice.describe())
    if "nextstep_family" not in raw or family not in (None, AUTO):  # a converted file keeps its recorded reason
        raw = dict(raw, nextstep_family=choice.family, nextstep_family_reason=choice.reason)
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
    get = source.reader.get if source.reader else _lazy_get(source.key_files)
    return _job(src, dst, base, dtype, items, lambda k: [get(k)] if k in kept else _convert_one(k, get(k), dtype),
                meta)


def _plan_vae(src: str, dst: str, base: str, dtype: str) -> Conversion:
    cfg, state, source = vae_files(src)
    target = dtype if dtype in ("bf16", "fp16") else "fp32"  # a VAE is never quantised: it is small
    if state is None:
        _check_not_source(dst, src, source.files)
        get = _lazy_get(source.key_files)
        shapes, dtypes = source.shapes, source.dtypes
    else:
        _check_not_source(dst, src, [os.path.join(src, "checkpoint.pt")])
        get = state.__getitem__
        shapes = {k: tuple(t.shape) for k, t in state.items()}
        dtypes = {k: ST_DTYPES.get(t.dtype, str(t.dtype)) for k, t in state.items()}
    items = [(k, _plan(src, k, shapes[k], dtypes[k], target)) for k in shapes]
    meta = {META_FORMAT: "1", META_VAE_CONFIG: json.dumps(cfg.to_json_dict()), "nextstep_kind": "vae"}
    return _job(src, dst, base, dtype, items, lambda k: _convert_one(k, get(k), target), meta)


def convert(src: str, dst: str, dtype: str = "bf16", keep_lm_head: bool = False, family: str | None = AUTO,
            progress=None, should_cancel=None) -> str:
    """Write `dst` (one .safetensors) from `src`; returns dst. `plan_conversion` + `Conversion.run`."""
    return plan_conversion(src, dst, dtype, keep_lm_head, family).run(progress, should_cancel)
