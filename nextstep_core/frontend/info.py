"""`info`: validate a model or VAE (headers only, nothing heavy is read) and say what it is."""
from __future__ import annotations

import os

import torch

from ..errors import CheckpointError
from ..fs import is_file
from ..weights.identify import AUTO, OVERRIDE_HINT, VAE, kind_of_path
from ..weights.loading import check_keys, expected_shapes, load_tokenizer, read_model_config, stored_layout
from ..weights.vae_files import vae_files


def size_text(n: int) -> str:
    """A file or memory size for people: GiB from a quarter of one, MiB below."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def describe(path: str, family: str | None = AUTO) -> str:
    """What `path` is; for a model, the family with the rule that decided it (`family` overrides, as on load)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        is_file(path, CheckpointError)  # a fault on the path (permission, a link loop) is named as itself
        raise CheckpointError(f"{path} does not exist.")
    return _describe_vae(path) if kind_of_path(path) == VAE else _describe_model(path, family)


def _describe_model(path: str, family: str | None) -> str:
    from ..model.decoder import NextStep
    from ..weights.quant import QUANT_SUFFIXES

    cfg, src = read_model_config(path, family)
    tok = load_tokenizer(src)
    tok.check_against(cfg, src.path)
    with torch.device("meta"):
        expected = expected_shapes(NextStep(cfg, with_lm_head="lm_head.weight" in src.shapes))
    stored = stored_layout(expected, src, src.metadata.get("nextstep_quant"))  # int4: two codes per byte
    unexpected = [k for k in check_keys(stored, src, "model", {"gen_pos_embed"}) if not k.endswith(QUANT_SUFFIXES)]
    n_params = sum(torch.Size(s).numel() for k, s in expected.items() if k in src.shapes)
    as_stored = src.packed.origin if src.packed is not None else src  # an AutoRound / GPTQ folder: its own files
    dtypes = sorted(set(as_stored.dtypes.values()))
    size = sum(os.path.getsize(f) for f in as_stored.files)
    lines = [
        f"NextStep model: {path}",
        f"  family:      {cfg.family_choice}",
        *([f"               {OVERRIDE_HINT}"] if cfg.family_guessed else []),
        f"  decoder:     {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads "
        f"/ {cfg.num_key_value_heads} kv heads, MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}",
        f"  head:        {cfg.fm_head_layers} blocks of {cfg.fm_head_dim}; tokens of {cfg.token_dim} "
        f"({cfg.latent_channels} ch, patch {cfg.latent_patch_size})",
        f"  parameters:  {n_params:,}",
        f"  stored as:   {', '.join(dtypes)}" + (f" (quantised {src.metadata['nextstep_quant']})"
                                                   if "nextstep_quant" in src.metadata and not src.packed else ""),
        *(src.packed.describe() if src.packed is not None else []),
        f"  files:       {len(as_stored.files)} file(s), {size_text(size)}",
        *[f"    {os.path.relpath(f, path) if src.kind == 'folder' else os.path.basename(f)}" for f in as_stored.files],
        f"  LM head:     {'present (not loaded for image generation)' if 'lm_head.weight' in src.shapes else 'absent'}",
        f"  tokenizer:   ok (BOS {tok.bos_token!r})",
    ]
    if unexpected:
        lines.append(f"  unexpected:  {len(unexpected)} tensor(s) that will not be loaded: {unexpected[:5]}")
    vae = os.path.join(path, "vae") if src.kind == "folder" else None
    if vae and os.path.isdir(vae):
        lines.append("  vae/:        " + _describe_vae(vae).splitlines()[0].split(": ", 1)[0] + " present")
    return "\n".join(lines)


def _describe_vae(path: str) -> str:
    from ..model.vae import AutoEncoder

    cfg, state, src = vae_files(path)
    with torch.device("meta"):
        expected = expected_shapes(AutoEncoder(cfg))
    if state is not None:
        from ..weights.loading import Source

        src = Source(path, "folder", {k: path for k in state}, {k: tuple(v.shape) for k, v in state.items()}, {})
    unexpected = check_keys(expected, src, "VAE")
    n = sum(torch.Size(s).numel() for s in src.shapes.values())
    lines = [
        f"NextStep VAE (f8 tokenizer): {path}",
        f"  channels:    z {cfg.z_channels}, base {cfg.ch}, mult {list(cfg.ch_mult)}, {cfg.num_res_blocks} res blocks",
        f"  latents:     scale {cfg.scaling_factor}, shift {cfg.shift_factor}, encoder_norm {cfg.encoder_norm}, "
        f"psz {cfg.psz}",
        f"  parameters:  {n:,}",
    ]
    if unexpected:
        lines.append(f"  unexpected:  {len(unexpected)} tensor(s) that will not be loaded: {unexpected[:5]}")
    return "\n".join(lines)
