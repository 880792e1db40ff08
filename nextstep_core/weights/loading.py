"""Finding, validating and streaming checkpoints into the modules.

Accepted model inputs:
- a folder in the official Hugging Face layout: `config.json`, `model.safetensors` or shards with
  `model.safetensors.index.json`, `tokenizer.json` (+ `tokenizer_config.json`), optionally `vae/`;
- one `.safetensors` file whose metadata carries the config and tokenizer (written by `convert`);
- a folder quantised by AutoRound / GPTQ (4-bit, `quantization_config` in config.json): read through `gptq.py`,
  its packed linears arriving in our int4 file layout.
Accepted VAE inputs: a folder with `config.json` + `checkpoint.pt` (or `*.safetensors`), or one `.safetensors`
file with the config in its metadata.

Modules are built on the meta device; then each tensor is read on its own, checked against the expected shape,
cast and placed, so peak RAM is the target model plus one source tensor. Nothing from a model folder is executed:
`.pt` files go through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ModelConfig, model_config_from_dict, read_json, vae_config_from_dict
from .gptq import PackedCheckpoint, packed_format, packed_layers
from ..errors import CheckpointError, NextStepError
from ..fs import fs_error, is_file, list_folder
from .identify import AUTO, MODEL, VAE, kind_of_config, kind_of_safetensors, wrong_kind

log = logging.getLogger("nextstep")

META_CONFIG, META_TOKENIZER, META_TOKENIZER_CONFIG = "nextstep_config", "nextstep_tokenizer", "nextstep_tokenizer_config"
META_VAE_CONFIG, META_FORMAT = "nextstep_vae_config", "nextstep_format"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# keys in the published files that generation never needs
_SKIPPABLE = ("lm_head.weight", "gen_pos_embed")


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise NextStepError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16.") from None


def check_dtype_supported(dtype: torch.dtype, device: torch.device) -> None:
    """Fail early, with advice, where a device cannot compute in this dtype."""
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as e:
        raise NextStepError(f"{device} cannot compute in {dtype} ({str(e).splitlines()[0]}). "
                            "Pick another weight dtype (float32 always works; bfloat16 needs a recent GPU or "
                            "Apple M2 or newer with a recent PyTorch).") from None


@dataclass
class Source:
    """What a checkpoint path holds, before anything heavy is read."""
    path: str
    kind: str  # "folder" or "file"
    key_files: dict  # key -> file
    shapes: dict  # key -> tuple
    dtypes: dict  # key -> str
    metadata: dict = field(default_factory=dict)
    packed: object = None  # gptq.PackedCheckpoint of an AutoRound / GPTQ folder (its keys are then a view)
    reader: object = None  # reads every key of such a view by name; None: each key from its own file

    @property
    def files(self) -> list[str]:
        return sorted(set(self.key_files.values()))


def _read_header(path: str):
    from .st_io import read_header

    try:
        meta, entries, _ = read_header(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing. Download every shard listed in model.safetensors.index.json.") \
            from None
    except OSError as e:  # the file system's fault (permission, a link loop, a folder): never "download it again"
        raise fs_error("read", path, e, CheckpointError) from None
    shapes = {k: tuple(e["shape"]) for k, e in entries.items()}
    return meta, shapes, {k: e["dtype"] for k, e in entries.items()}


def scan_safetensors(files: list[str], path: str, kind: str) -> Source:
    key_files, shapes, dtypes, metadata = {}, {}, {}, {}
    for fpath in files:
        meta, s, d = _read_header(fpath)
        metadata = metadata or meta
        for k in s:
            key_files[k] = fpath
        shapes.update(s)
        dtypes.update(d)
    return Source(path, kind, key_files, shapes, dtypes, metadata)


def model_source(path: str) -> tuple[Source, dict]:
    """(Source, raw config dict) for a model folder or single file."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raw = read_json(os.path.join(path, "config.json"))
        if kind_of_config(raw) == VAE:  # the wrong kind of folder fails here, first
            raise wrong_kind(path, MODEL, VAE)
        model_config_from_dict(raw, os.path.join(path, "config.json"), path)
        index = os.path.join(path, "model.safetensors.index.json")
        if is_file(index, CheckpointError):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map; download it again.")
            files = sorted({os.path.join(path, f) for f in weight_map.values()})
            src = scan_safetensors(files, path, "folder")
            missing = sorted(k for k, f in weight_map.items() if k not in src.key_files)
            if missing:
                raise CheckpointError(f"{weight_map[missing[0]]} lacks {len(missing)} tensor(s) the index lists "
                                      f"(e.g. {missing[0]}): the shard is from another download; fetch it again.")
        else:
            files = sorted(os.path.join(path, f) for f in list_folder(path, CheckpointError)
                           if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{path} has config.json but no model*.safetensors weights. Download the "
                                      "model's safetensors shards into this folder.")
            src = scan_safetensors(files, path, "folder")
        fmt = packed_format(raw, os.path.join(path, "config.json"))
        if fmt is not None:  # AutoRound / GPTQ: the packed linears as our int4 layout
            src = PackedCheckpoint(src, fmt, packed_layers(src.shapes, fmt, path)).view()
        return src, raw
    if os.path.isfile(path) and path.endswith((".safetensors", ".sft")):
        src = scan_safetensors([path], path, "file")
        if kind_of_safetensors(src.metadata, src.shapes) == VAE:
            raise wrong_kind(path, MODEL, VAE)
        if META_CONFIG not in src.metadata:
            raise CheckpointError(f"{path} carries no NextStep config in its metadata. Single-file models must be "
                                  "written by `python -m nextstep_core convert`; or load the original model folder.")
        return src, json.loads(src.metadata[META_CONFIG])
    if is_file(path, CheckpointError):  # a fault on the path (permission, a link loop) is named here
        raise CheckpointError(f"{path}: expected a model folder (with config.json) or a .safetensors file.")
    raise CheckpointError(f"{path} does not exist.")


def find_vae_for_model(model_path: str) -> str | None:
    """The `vae/` folder shipped inside a model folder, if there is one with a config."""
    cand = os.path.join(os.path.abspath(model_path), "vae")
    return cand if is_file(os.path.join(cand, "config.json"), CheckpointError) else None  # unreadable: said so


def set_tensor(module: nn.Module, key: str, value: torch.Tensor) -> None:
    *path, name = key.split(".")
    for p in path:
        module = getattr(module, p)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise KeyError(key)


def stream_into(module: nn.Module, src: Source, keys: list[str], dtype: torch.dtype, device,
                keep_dtype=lambda key, t: False, quantize: str | None = None) -> None:
    """Read each key from its file, cast (unless `keep_dtype`) or quantise, place, and assign it into `module`."""
    from .quant import quantized_tensors
    from .st_io import TensorReader

    readers = {}
    for k in keys:
        fpath = src.key_files[k]
        try:
            reader = src.reader or readers.get(fpath) or readers.setdefault(fpath, TensorReader(fpath))
            t = reader.get(k)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{fpath}: reading {k} failed ({e}); the file is truncated or corrupt, download it "
                                  "again.") from None
        parts = quantized_tensors(k, t.to(device), quantize) if quantize and t.element_size() > 1 else None
        if parts:
            for key, value in parts:
                set_tensor(module, key, value)
            continue
        if t.is_floating_point() and not keep_dtype(k, t):
            t = t.to(dtype)
        host = k.split(".", 1)[0] in getattr(module, "HOST_MODULES", ())  # the model keeps these on the host
        set_tensor(module, k, t if host else t.to(device))
        del t


def check_keys(expected: dict, src: Source, what: str, optional=()) -> list[str]:
    """Error on missing keys or wrong shapes; return the unexpected keys (reported, not loaded)."""
    missing = [k for k in expected if k not in src.shapes and k not in optional]
    if missing:
        raise CheckpointError(
            f"{src.path}: {len(missing)} {what} tensor(s) missing, e.g. {missing[:3]}. The checkpoint is incomplete "
            "or is not a NextStep checkpoint of this configuration.")
    for k, shape in expected.items():
        if k in src.shapes and tuple(src.shapes[k]) != tuple(shape):
            raise CheckpointError(
                f"{src.key_files[k]}: {k} has shape {list(src.shapes[k])} but the config implies {list(shape)}. "
                "config.json and the weights come from different models.")
    return sorted(k for k in src.shapes if k not in expected)


def expected_shapes(module: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def stored_layout(expected: dict, src: Source, quant: str | None) -> dict:
    """{key: shape} of a module's tensors as `src` holds them: our format's rule for `quant`, and int4 (two codes per
    byte) for every layer whose `weight_zero` the source holds (an AutoRound / GPTQ folder decides layer by layer)."""
    from .quant import stored_shapes

    shapes = dict(stored_shapes(expected, None if src.packed is not None else quant))
    for k, s in expected.items():
        if k.endswith(".weight") and k[: -len("weight")] + "weight_zero" in src.shapes:
            shapes[k] = (s[0], s[1] // 2)
    return shapes


def read_model_config(path: str, family: str | None = AUTO) -> tuple[ModelConfig, Source]:
    """The config (family resolved as identify.py describes; `family` overrides) and what the path holds."""
    src, raw = model_source(path)
    cfg = model_config_from_dict(raw, os.path.join(src.path, "config.json") if src.kind == "folder" else src.path,
                                 src.path, family)
    # The weights decide which projections carry a bias: a config that omits o_attention_bias must not guess.
    if "layers.0.self_attn.o_proj.bias" in src.shapes:
        cfg.o_attention_bias = True
    elif "layers.0.self_attn.o_proj.weight" in src.shapes:
        cfg.o_attention_bias = False
    return cfg, src


def load_tokenizer(src: Source):
    from .tokenizer import Tokenizer

    if src.kind == "folder":
        return Tokenizer.from_folder(src.path)
    if META_TOKENIZER not in src.metadata:
        raise CheckpointError(f"{src.path} carries no tokenizer in its metadata; re-create it with "
                              "`python -m nextstep_core convert`.")
    return Tokenizer(src.metadata[META_TOKENIZER], json.loads(src.metadata.get(META_TOKENIZER_CONFIG, "{}")))


def load_model(path: str, dtype="bfloat16", device=None, operations=None, attn_backend: str = "sdpa",
               load_lm_head: bool = False, quantize: str | None = None, family: str | None = AUTO,
               target_device=None):
    """Load a NextStep AR model (decoder, projectors, flow-matching head) and its tokenizer.

    `family`: "auto" decides NextStep-1 or 1.1 by the rule in identify.py and logs the decision with its reason
    (logger "nextstep"; a warning with how to override when it was a guess); "nextstep-1" / "nextstep-1.1" set it.

    `operations` supplies the layer classes (Linear, Embedding, LayerNorm; default torch.nn). The LM head is
    skipped unless `load_lm_head`, since image generation never reads it. Weights stored in fp8/int8/int4
    by `convert` stay so; `quantize="fp8"|"int8"|"int4"` quantises a bf16/fp32 checkpoint the same way while
    loading (tensor by tensor, so the unquantised model is never in memory). `dtype` is the compute dtype.
    `target_device`: where the model will run when it is loaded elsewhere first (a host that offloads, as ComfyUI
    does): quantised weights are then packed for their kernels once, when they get there.
    """
    from .cpu_pack import pack_linears
    from ..model.decoder import NextStep
    from .quant import QUANT_FORMATS, QUANT_SUFFIXES, prepare_quantized, quantized_operations
    from .quant_fp8 import dense_head

    cfg, src = read_model_config(path, family)
    dtype, device = parse_dtype(dtype), torch.device(device or "cpu")
    check_dtype_supported(dtype, device)
    log.log(logging.WARNING if cfg.family_guessed else logging.INFO, "%s: family: %s", src.path,
            cfg.family_choice.describe())
    if attn_backend not in ("sdpa", "flash"):
        raise NextStepError(f"unknown attention backend {attn_backend!r}; use 'sdpa' or 'flash'.")
    if attn_backend == "flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise NextStepError("attention backend 'flash' needs the flash-attn package, which is not installed; "
                                "use 'sdpa' (the default, same results).") from None
    tok = load_tokenizer(src)
    tok.check_against(cfg, src.path)
    quant = src.metadata.get("nextstep_quant")
    if src.packed is not None:
        src.packed.check_loadable()
    if quantize is not None and quant is not None and quantize != quant:
        raise NextStepError(f"{src.path} is already quantised as {quant}; it cannot be loaded as {quantize}.")
    if quantize is not None and quantize not in QUANT_FORMATS:
        raise NextStepError(f"unknown quantisation {quantize!r}; use one of {', '.join(QUANT_FORMATS)}.")
    quantize = None if quant else quantize
    quant = quant or quantize
    if quant == "fp8" and device.type == "mps":
        raise NextStepError(f"{src.path}: Apple GPUs (MPS) cannot hold fp8 weights. Use int8 (convert --dtype int8, "
                            "or weight dtype int8 on the loader) or bf16 there.")
    ops = quantized_operations(quant, operations) if quant else operations
    with torch.device("meta"):
        model = NextStep(cfg, ops, attn_backend, with_lm_head=load_lm_head)
    expected = expected_shapes(model)
    expected = stored_layout(expected, src, None if quantize else quant)  # int4: two codes per byte
    optional = {"gen_pos_embed"} | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    unexpected = check_keys(expected, src, "model", optional)
    unexpected = [k for k in unexpected if not k.startswith(_SKIPPABLE) and not k.endswith("rotary_emb.inv_freq")
                  and not k.endswith(QUANT_SUFFIXES)]
    if unexpected:
        log.warning("%s: %d unexpected tensor(s) not loaded: %s", src.path, len(unexpected), unexpected[:5])
    keys = [k for k in expected if k in src.shapes]
    keys += [k for k in src.shapes if k.endswith(QUANT_SUFFIXES) and k.rsplit(".", 1)[0] + ".weight" in expected]
    stream_into(model, src, keys, dtype, device, keep_dtype=lambda k, t: k.endswith(QUANT_SUFFIXES)
                or (quant is not None and t.element_size() == 1), quantize=quantize)
    if cfg.use_gen_pos_embed and "gen_pos_embed" not in src.shapes:
        from ..model.decoder import sincos_2d_table

        set_tensor(model, "gen_pos_embed", sincos_2d_table(cfg.hidden_size, cfg.base_image_grid_size)[None]
                   .to(device, dtype))
    model.fuse_projections()  # q/k/v and gate/up as one matmul each, built once from the published tensors
    if quant:
        if quant == "fp8":
            dense_head(model, dtype)  # fp8 keeps the head in the compute dtype (older files quantised it)
        prepare_quantized(model, dtype, target_device)  # each layer's kernel for its device, packed once
    if load_lm_head and "lm_head.weight" not in src.shapes:
        model.lm_head.weight = model.embed_tokens.weight
    model.tokenizer = tok
    model.latent_affine = _latent_affine(src)
    model.source_path = src.path
    model.unexpected_keys = unexpected
    model.quant = quant
    model.eval().requires_grad_(False)
    pack_linears(model)  # CPU: dense weights in the matmul's own layout, laid out once instead of per call
    return model


def _latent_affine(src: Source) -> tuple[float, float]:
    """(scale, shift) between the AR model's latents and raw VAE latents, from the VAE config shipped with the model.

    Without one (a bare folder), identity, which is what the published f8ch16 tokenizer's config specifies.
    """
    raw = None
    if src.kind == "folder":
        vae_dir = find_vae_for_model(src.path)
        raw = read_json(os.path.join(vae_dir, "config.json")) if vae_dir else None
    elif META_VAE_CONFIG in src.metadata:
        raw = json.loads(src.metadata[META_VAE_CONFIG])
    if not raw:
        return 1.0, 0.0
    cfg = vae_config_from_dict(raw, src.path)
    return float(cfg.scaling_factor), float(cfg.shift_factor)
