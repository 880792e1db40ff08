"""Where NextStep files live: the `nextstep` model folder, model/VAE discovery, and the optional download
(through the engine's download module, the same one the command line uses).

`models/nextstep/` is registered with add_model_folder_path (which appends), so paths a user gives for `nextstep`
in extra_model_paths.yaml are kept and searched too. Official checkpoints are folders (config.json, safetensors
shards, tokenizer, vae/), which ComfyUI's file lists cannot show, so the folders are discovered here.
"""
from __future__ import annotations

import os

import folder_paths

from ..nextstep_core.weights.download import download_repo
from ..nextstep_core.weights.identify import kind_of_path

FOLDER = "nextstep"
folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))

# Published checkpoints, offered in the loaders even before they are on disk (the run then says where to put
# them, or downloads them when asked). name in the combo -> (Hugging Face repo, subfolder inside it or None)
KNOWN_MODELS = {
    "NextStep-1.1": ("stepfun-ai/NextStep-1.1", None),
    "NextStep-1-Large": ("stepfun-ai/NextStep-1-Large", None),
    "NextStep-1-Large-Edit": ("stepfun-ai/NextStep-1-Large-Edit", None),
    "NextStep-1.1-W4A16-AutoRound": ("INCModel/NextStep-1.1-W4A16-AutoRound", None),  # 4-bit, about 10 GB
}
KNOWN_VAES = {
    "NextStep-1.1/vae": ("stepfun-ai/NextStep-1.1", "vae"),
    "NextStep-1-Large/vae": ("stepfun-ai/NextStep-1-Large", "vae"),
    "NextStep-1-Large-Edit/vae": ("stepfun-ai/NextStep-1-Large-Edit", "vae"),
    "NextStep-1.1-W4A16-AutoRound/vae": ("INCModel/NextStep-1.1-W4A16-AutoRound", "vae"),
    "NextStep-1-f8ch16-Tokenizer": ("stepfun-ai/NextStep-1-f8ch16-Tokenizer", None),
}
_MAX_DEPTH = 3  # nextstep/<org>/<model>/vae is the deepest layout worth finding


def _single_file_folders() -> list[str]:
    """ComfyUI's folder for single-file diffusion models: `diffusion_models`, called `unet` before mid-2024."""
    names = [n for n in ("diffusion_models", "unet") if n in folder_paths.folder_names_and_paths]
    return names[:1]


def _walk(kind: str) -> dict[str, str]:
    """Folders of one kind under every registered `nextstep` path: combo name (relative, '/') -> absolute path."""
    found: dict[str, str] = {}
    for base in folder_paths.get_folder_paths(FOLDER):
        if not os.path.isdir(base):
            continue
        for root, dirs, _files in os.walk(base, followlinks=True):
            rel = os.path.relpath(root, base)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            dirs[:] = [d for d in sorted(dirs) if not d.startswith(".")] if depth < _MAX_DEPTH else []
            if depth and kind_of_path(root) == kind:
                found.setdefault(rel.replace(os.sep, "/"), root)
    return found


def model_choices() -> list[str]:
    files = [f for name in _single_file_folders() for f in folder_paths.get_filename_list(name)
             if f.endswith(".safetensors")]
    return sorted(set(_walk("model")) | set(KNOWN_MODELS)) + sorted(files)


def vae_choices() -> list[str]:
    files = [f for f in folder_paths.get_filename_list("vae") if f.endswith((".safetensors", ".pt", ".pth"))]
    return sorted(set(_walk("vae")) | set(KNOWN_VAES)) + sorted(files)


def _expected_location(name: str) -> str:
    return os.path.join(folder_paths.get_folder_paths(FOLDER)[0], *name.split("/"))


def resolve(name: str, kind: str, download: bool) -> str:
    """The path the engine loads for a combo value; downloads a known checkpoint when allowed."""
    found = _walk(kind).get(name)
    if found:
        return found
    single = _resolve_file(name, kind)
    if single:
        return single
    known = (KNOWN_MODELS if kind == "model" else KNOWN_VAES).get(name)
    if known is None:
        raise FileNotFoundError(f"NextStep {kind} {name!r} was not found in any 'nextstep' model folder "
                                f"({', '.join(folder_paths.get_folder_paths(FOLDER))}); refresh the node list.")
    repo, sub = known
    dest = _expected_location(name if sub is None else name.rsplit("/", 1)[0])
    url = f"https://huggingface.co/{repo}"
    if not download:
        where = os.path.join(dest, sub) if sub else dest
        raise FileNotFoundError(f"{name} is not downloaded. Get {url} into {where} (with its config.json), "
                                "or set 'download' to true on this node.")
    download_repo(repo, dest, sub)  # raises NextStepError saying where to put the files by hand
    if kind_of_path(os.path.join(dest, sub) if sub else dest) != kind:
        raise FileNotFoundError(f"Downloaded {url} into {dest}, but it has no {kind} config.json there.")
    return os.path.join(dest, sub) if sub else dest


def _resolve_file(name: str, kind: str) -> str | None:
    folders = _single_file_folders() if kind == "model" else ["vae"]
    for folder in folders:
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    return None
