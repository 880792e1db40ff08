"""Typed configs read from the published `config.json` files.

The AR model's config is a Llama/Qwen2-style dict with NextStep's extra fields (see the reference notes, §2.1
and §14.7); the VAE's is the f8ch16 tokenizer's own `config.json`. Fields that the published files may lack get
the defaults of the model they belong to (Qwen2.5-14B for the decoder), which are documented on each field.

The family (NextStep-1 or 1.1) is not a config field of the published files: `identify.resolve_family` decides it,
in this order, from our own `nextstep_family` key, the published repository name (download record, folder name,
`_name_or_path`), weak config evidence, else a NextStep-1 default, and `ModelConfig` keeps the answer with its reason
(`family`, `family_reason`, `family_guessed`). An explicit `family=` wins over all of it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import CheckpointError
from ..fs import fs_error
from ..model.family import FAMILIES, FAMILY_V1, FAMILY_V1_1  # noqa: F401  (re-exported: ns.FAMILIES etc.)
from .identify import AUTO, MODEL, V11_MODEL_TYPE, VAE, FamilyChoice, kind_of_config, resolve_family, wrong_kind


@dataclass
class ModelConfig:
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    vocab_size: int = 152064  # Qwen2.5-14B
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6  # Qwen2.5-14B; Llama's 1e4 default would be wrong for this model
    attention_bias: bool = True  # q, k and v carry a bias ...
    o_attention_bias: bool = False  # ... o_proj does not (Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    bos_token_id: int = 151643
    eos_token_id: int = 151643
    boi: int = 151667
    eoi: int = 151668
    image_placeholder_id: int = 151669
    pad_token_id_added: int = 151665
    latent_channels: int = 16
    latent_patch_size: int = 2
    latent_size: int = 64
    fm_head_dim: int = 1536
    fm_head_layers: int = 12
    fm_head_mlp_ratio: float = 1.0
    use_gen_pos_embed: bool = False
    base_image_grid_size: int = 32
    family: str = FAMILY_V1  # decided by identify.resolve_family (see there for the rule)
    family_reason: str = ""  # why, in words: "from the folder name 'NextStep-1-Large'"
    family_guessed: bool = False  # weak evidence or a default: tell the user how to set it
    name: str = ""
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def family_choice(self) -> FamilyChoice:
        """The family with its reason; `.describe()` adds how to override it when it was a guess."""
        return FamilyChoice(self.family, self.family_reason or "set on the config", self.family_guessed)

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.latent_patch_size**2

    @property
    def down_factor(self) -> int:
        """Pixels per image token along each side: the VAE's 8 times the patch size."""
        return 8 * self.latent_patch_size

    def to_json_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        d["model_type"] = "nextstep"
        d["nextstep_family"] = d.pop("family")
        reason = d.pop("family_reason")
        if reason:
            d["nextstep_family_reason"] = reason
        d.pop("family_guessed")
        d.pop("name")
        return d


# keys of the HF files that do not change inference (training weights, bookkeeping)
_IGNORED = {
    "architectures", "auto_map", "model_type", "torch_dtype", "transformers_version", "_attn_implementation_autoset",
    "initializer_range", "max_window_layers", "use_cache", "hidden_act", "lm_loss_weight", "im_loss_weight",
    "fm_head_batch_mul", "attention_dropout", "pretraining_tp", "rope_scaling", "use_sliding_window",
    "sliding_window", "vae_name_or_path", "_name_or_path", "attn_implementation", "nextstep_family",
    "nextstep_family_reason",
}
# model_type values of NextStep configs: the HF / NextStep-1 code writes "nextstep", NextStep-1.1's GitHub inference
# code (a Qwen2Config subclass) "stepx_llama" (reference notes §14.7)
MODEL_TYPES = (None, "nextstep", V11_MODEL_TYPE)


def model_config_from_dict(raw: dict, source: str = "config.json", location: str | None = None,
                           family: str | None = AUTO) -> ModelConfig:
    """The typed config; `location` (the model folder or file) and `family` feed the family rule of identify.py."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object.")
    if kind_of_config(raw) == VAE:
        raise wrong_kind(location or source, MODEL, VAE)
    nextstep_keys = {"boi", "image_placeholder_id", "fm_head_dim", "latent_patch_size"}
    if raw.get("model_type") not in MODEL_TYPES or not nextstep_keys & raw.keys():
        kind = raw.get("model_type") or "unknown"
        raise CheckpointError(
            f"{source} is not a NextStep model config (model_type {kind!r}, no NextStep image fields such as "
            "'boi' or 'fm_head_dim'). A plain Qwen2/Llama checkpoint cannot generate images; download a NextStep "
            "model (e.g. stepfun-ai/NextStep-1-Large) and point the loader at its folder.")
    known = {f.name for f in fields(ModelConfig)} - {"extra", "name", "family", "family_reason", "family_guessed"}
    kwargs: dict[str, Any] = {}
    extra = {}
    for k, v in raw.items():
        if k in known:
            kwargs[k] = v
        elif k not in _IGNORED:
            extra[k] = v
    if kwargs.get("o_attention_bias") is None:  # HF: None means "same as attention_bias"
        kwargs["o_attention_bias"] = False if "o_attention_bias" not in raw else kwargs.get("attention_bias", True)
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (NextStep uses silu).")
    if raw.get("rope_scaling"):
        raise CheckpointError(f"{source}: rope_scaling {raw['rope_scaling']!r} is not supported (NextStep uses "
                              "default RoPE).")
    cfg = ModelConfig(**kwargs, extra=extra)
    choice = resolve_family(raw, location, family)
    cfg.family, cfg.family_reason, cfg.family_guessed = choice.family, choice.reason, choice.guessed
    cfg.name = str(raw.get("_name_or_path", "") or "")
    if not cfg.head_dim:
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    _check_model_config(cfg, source)
    return cfg


def _check_model_config(c: ModelConfig, source: str) -> None:
    problems = []
    if c.num_attention_heads % c.num_key_value_heads:
        problems.append(f"num_attention_heads {c.num_attention_heads} is not a multiple of num_key_value_heads "
                        f"{c.num_key_value_heads}")
    if c.head_dim % 2:
        problems.append(f"head_dim {c.head_dim} must be even for RoPE")
    for name in ("boi", "eoi", "image_placeholder_id"):
        if not 0 <= getattr(c, name) < c.vocab_size:
            problems.append(f"{name} = {getattr(c, name)} is outside the vocabulary (vocab_size {c.vocab_size})")
    if c.latent_patch_size < 1 or c.latent_channels < 1:
        problems.append("latent_patch_size and latent_channels must be positive")
    if c.use_gen_pos_embed and c.hidden_size % 4:
        problems.append("use_gen_pos_embed needs hidden_size divisible by 4")
    if problems:
        raise CheckpointError(f"{source}: contradictory config: " + "; ".join(problems) + ".")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing.") from None
    except OSError as e:  # permission, a link loop, a folder by that name: the file system's fault, said as such
        raise fs_error("read", path, e, CheckpointError) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it.") from None


def load_model_config(folder: str, family: str | None = AUTO) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    return model_config_from_dict(read_json(path), path, folder, family)


@dataclass
class VAEConfig:
    """The f8ch16 tokenizer: a FLUX autoencoder with NextStep's latent normalisation.

    Defaults are the GitHub reference's dataclass defaults (FLUX values); the published `config.json`
    overrides them, and loading warns nowhere because the file is the authority.
    """
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    deterministic: bool = False
    encoder_norm: bool = False
    psz: int | None = None

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_json_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(d["ch_mult"])
        return d


_VAE_IGNORED = {"_class_name", "_diffusers_version", "model_type", "architectures", "torch_dtype"}


def vae_config_from_dict(raw: dict, source: str = "config.json") -> VAEConfig:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object.")
    kind = kind_of_config(raw)
    if kind == MODEL:
        raise wrong_kind(source, VAE, MODEL)
    known = {f.name for f in fields(VAEConfig)}
    kwargs = {}
    unknown = []
    for k, v in raw.items():
        if k in known:
            kwargs[k] = tuple(v) if k == "ch_mult" else v
        elif k not in _VAE_IGNORED:
            unknown.append(k)
    if kind != VAE:
        raise CheckpointError(f"{source} is not a NextStep VAE config (no z_channels/ch_mult/scaling_factor). "
                              "Use the f8ch16 tokenizer's config.json.")
    cfg = VAEConfig(**kwargs)
    if cfg.psz is not None and cfg.psz < 1:
        raise CheckpointError(f"{source}: psz must be a positive integer or null, got {cfg.psz}.")
    return cfg


def load_vae_config(folder: str) -> VAEConfig:
    path = os.path.join(folder, "config.json")
    return vae_config_from_dict(read_json(path), path)
