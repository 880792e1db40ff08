"""What a checkpoint is, decided in one place: a model or a VAE, and for a model its family, with the reason.

Kind (`kind_of_config`, `kind_of_path`): a config with `hidden_size` / `fm_head_dim` describes the AR model, one with
the autoencoder's fields (`z_channels`, `ch_mult`, ...) the f8ch16 VAE; a folder is what its `config.json` says
(a folder with only `checkpoint.pt` is a VAE), a `.pt` file is a VAE, a `.safetensors` file is what its metadata or
its tensor names say. Everything that asks "is this the model or the VAE?" asks here, and `wrong_kind` words the
error when the answer is the other one.

Family (`resolve_family`), with `family="auto"` (anything else is taken as given), first match wins:

1. our own key: `nextstep_family` in config.json or in a converted file's metadata (written by `convert`, which
   records the family it resolved, and by `nextstep_core.testing`);
2. the published repository name, from (in this order) the Hugging Face repo id the download module recorded in the
   folder (`nextstep_download.json`) or the Hugging Face cache folder (`models--stepfun-ai--NextStep-1.1`), the
   folder's (or file's) own name, and `_name_or_path` in config.json: `NextStep-1.1*` is NextStep-1.1,
   `NextStep-1-Large*` (Large, -Edit, -Pretrain) is NextStep-1 (case-insensitive; an owner prefix is fine);
3. the config class that saved it: `model_type: "stepx_llama"` is NextStep-1.1. Only NextStep-1.1's GitHub
   inference class writes it (`inference/nextstep_model.py` at `d6759c2`, a Qwen2Config); NextStep-1's
   `NextStepConfig` writes "nextstep" in every commit of its code (`d979f38` … `6e49bae`), as do the HF code and
   the 1.1 training code (reference notes §14.7), so "nextstep" says nothing either way;
4. weak config evidence: keys that only the 1.1-era training code writes (GitHub `d6759c2`, reference notes §14.7:
   `hw_aspect_ratios_ids`, `noise_strength`, ...) suggest NextStep-1.1;
5. otherwise NextStep-1, as a default.

`o_attention_bias` and a relative `vae_name_or_path` ("vae/") are no evidence at all: the official NextStep-1
`NextStepConfig` writes both (reference notes §15), and reading them as 1.1 ran NextStep-1 checkpoints with the wrong
sampler. After rule 4 or 5, or when two names disagree, the reason says so and how to choose the family instead.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..errors import CheckpointError, NextStepError
from ..model.family import FAMILIES, FAMILY_V1, FAMILY_V1_1

MODEL, VAE, UNKNOWN = "model", "vae", "unknown"
AUTO = "auto"
FAMILY_CHOICES = (AUTO, *FAMILIES)
VAE_KEYS = frozenset({"z_channels", "ch_mult", "scaling_factor", "shift_factor", "encoder_norm"})
MODEL_KEYS = frozenset({"hidden_size", "fm_head_dim"})
DOWNLOAD_MARKER = "nextstep_download.json"  # {"repo_id": ...}, written by download.py next to what it fetched
OVERRIDE_HINT = ("if that is wrong, set the family: --family nextstep-1|nextstep-1.1 on the command line, the "
                 "Model Loader's family input in ComfyUI, or load_model(..., family=...)")

# published repository names -> family (matched at the start of the last path component)
_NAME_RULES = ((re.compile(r"nextstep-1\.1(?![0-9])", re.I), FAMILY_V1_1),
               (re.compile(r"nextstep-1-large", re.I), FAMILY_V1))
# config keys only the 1.1-era training code (GitHub d6759c2) writes: a hint, not proof
_V11_TRAINING_KEYS = ("hw_aspect_ratios_ids", "noise_strength", "use_mlp_before_lm_head", "use_token_length_weight",
                      "image_loss_weight", "attention_use_qk_norm")
# the model_type only NextStep-1.1's GitHub inference config class writes (rule 3)
V11_MODEL_TYPE = "stepx_llama"
_HF_CACHE_DIR = re.compile(r"^models--([^/\\]+?)--([^/\\]+)$")


# ---- kind -------------------------------------------------------------------------------------------------------

def kind_of_config(raw) -> str:
    """MODEL, VAE or UNKNOWN for a parsed config.json (or a config from a file's metadata)."""
    if not isinstance(raw, dict):
        return UNKNOWN
    if MODEL_KEYS & raw.keys():
        return MODEL
    return VAE if VAE_KEYS & raw.keys() else UNKNOWN


def kind_of_safetensors(metadata: dict, keys) -> str:
    """MODEL, VAE or UNKNOWN for a .safetensors file, from its metadata, else from its tensor names."""
    stated = metadata.get("nextstep_kind")
    if stated in (MODEL, VAE):
        return stated
    if "nextstep_config" in metadata:
        return MODEL
    if "nextstep_vae_config" in metadata:
        return VAE
    keys = list(keys)
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return VAE
    if any(k.startswith(("layers.", "embed_tokens.", "image_head.")) for k in keys):
        return MODEL
    return UNKNOWN


def kind_of_path(path: str) -> str:
    """MODEL, VAE or UNKNOWN for a folder or file, reading only config.json or a safetensors header."""
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                kind = kind_of_config(json.load(f))
        except (OSError, ValueError):
            kind = UNKNOWN
        if kind == UNKNOWN and os.path.isfile(os.path.join(path, "checkpoint.pt")):
            return VAE
        return kind
    if os.path.isfile(path) and path.endswith((".pt", ".pth")):
        return VAE  # only the VAE is published as a .pt
    if os.path.isfile(path) and path.endswith((".safetensors", ".sft")):
        from .st_io import TensorReader

        try:
            reader = TensorReader(path)
        except (CheckpointError, OSError, ValueError):
            return UNKNOWN
        return kind_of_safetensors(reader.metadata, reader.entries)
    return UNKNOWN


def wrong_kind(path: str, expected: str, found: str) -> CheckpointError:
    """The error for a VAE given where the model belongs, or the other way round."""
    if expected == MODEL and found == VAE:
        return CheckpointError(
            f"{path} is a VAE (the f8ch16 tokenizer), not the model: load it as the VAE (--vae on the command line, "
            "the NextStep VAE Loader in ComfyUI) and give the model folder (config.json + model-*.safetensors, or a "
            "file made by convert) as the model.")
    return CheckpointError(
        f"{path} is the NextStep AR model, not its VAE: give the VAE instead (the model folder's vae/ subfolder, the "
        "NextStep-1-f8ch16-Tokenizer folder, or a VAE file made by convert), and load this one as the model.")


# ---- family -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FamilyChoice:
    family: str
    reason: str  # e.g. "from the folder name 'NextStep-1-Large'"
    guessed: bool = False  # weak evidence, the default, or disagreeing names: the user should be told how to choose

    def __str__(self) -> str:
        return f"{self.family} ({self.reason})"

    def describe(self) -> str:
        """One line: the family, why, and how to override it when it was a guess."""
        return f"{self}; {OVERRIDE_HINT}" if self.guessed else str(self)


def family_from_name(name: str) -> str | None:
    """The family a published repository name (or a path ending in one) stands for, or None."""
    base = str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    for pattern, family in _NAME_RULES:
        if pattern.match(base):
            return family
    return None


def resolve_family(raw: dict, location: str | None = None, requested: str | None = AUTO) -> FamilyChoice:
    """The model's family by the rule in the module docstring.

    `raw`: the config dict; `location`: the model folder or single file it came from (None: the config alone);
    `requested`: "auto" (or None) to decide, or a family name, which wins over everything.
    """
    if requested not in (None, AUTO):
        if requested not in FAMILIES:
            raise NextStepError(f"unknown family {requested!r}; use one of {', '.join(FAMILY_CHOICES)}.")
        return FamilyChoice(requested, "set explicitly")
    own = raw.get("nextstep_family")
    if own is not None:
        if own not in FAMILIES:
            raise CheckpointError(f"{location or 'config.json'}: unknown nextstep_family {own!r}; expected one of "
                                  f"{FAMILIES}.")
        where = "the file's metadata" if location and os.path.isfile(location) else "config.json"
        earlier = raw.get("nextstep_family_reason")  # why convert chose it, kept with the file
        return FamilyChoice(own, f"from nextstep_family in {where}" + (f"; recorded there: {earlier}" if earlier
                                                                         else ""))
    named = [(label, name, family_from_name(name)) for label, name in _names(raw, location)]
    named = [n for n in named if n[2]]
    if named:
        label, name, family = named[0]
        reason = f"from {label} {name!r}"
        others = [f"{lab} {nm!r} suggests {fam}" for lab, nm, fam in named[1:] if fam != family]
        return FamilyChoice(family, reason + (f", but {'; '.join(others)}" if others else ""), guessed=bool(others))
    if raw.get("model_type") == V11_MODEL_TYPE:
        return FamilyChoice(FAMILY_V1_1, f"from model_type {V11_MODEL_TYPE!r} in config.json, which only "
                                         "NextStep-1.1's inference code writes (NextStep-1's writes 'nextstep')")
    hints = [k for k in _V11_TRAINING_KEYS if k in raw]
    if hints:
        return FamilyChoice(FAMILY_V1_1, f"weak evidence: config.json has {', '.join(hints)}, which only the "
                                         "NextStep-1.1-era training code writes", guessed=True)
    return FamilyChoice(FAMILY_V1, "the default: neither a nextstep_family key nor a published name such as "
                                   "NextStep-1.1 or NextStep-1-Large identifies it", guessed=True)


def _names(raw: dict, location: str | None) -> list[tuple[str, str]]:
    """(label, name) of every repository name on record, most trustworthy first."""
    out = []
    if location:
        location = os.path.abspath(location)
        folder = location if os.path.isdir(location) else None
        repo = recorded_repo(folder) if folder else None
        if repo:
            out.append(("the Hugging Face repo it was downloaded from", repo))
        for part in location.replace("\\", "/").split("/"):
            m = _HF_CACHE_DIR.match(part)
            if m:
                out.append(("the Hugging Face repo it was downloaded from", f"{m.group(1)}/{m.group(2)}"))
        if folder:
            out.append(("the folder name", os.path.basename(folder)))
        else:
            out.append(("the file name", os.path.splitext(os.path.basename(location))[0]))
    if raw.get("_name_or_path"):
        out.append(("the config's _name_or_path", str(raw["_name_or_path"])))
    return out


def recorded_repo(folder: str) -> str | None:
    """The Hugging Face repo id the download module recorded in `folder`, if any."""
    try:
        with open(os.path.join(folder, DOWNLOAD_MARKER), encoding="utf-8") as f:
            repo = json.load(f).get("repo_id")
    except (OSError, ValueError, AttributeError):
        return None
    return repo if isinstance(repo, str) and repo else None
