"""Getting a published checkpoint onto disk: the one place that calls Hugging Face, for the CLI and the nodes.

Downloads go into a folder the user sees (`models/nextstep/<name>`), never a hidden cache, and fetch only what loading
reads (configs, weights, tokenizer, the VAE; the repos' Python files are never needed: nothing from a model folder is
run). The repo id is recorded in the folder (`identify.DOWNLOAD_MARKER`), so the family can be told from it even after
the folder is renamed.
"""
from __future__ import annotations

import json
import os
import sys

from ..errors import NextStepError
from .identify import DOWNLOAD_MARKER, MODEL, VAE, kind_of_path, wrong_kind

# what loading reads: a model repo's configs, shards and tokenizer files, and its VAE (config + weights)
VAE_PATTERNS = ("*.json", "*.pt", "*.safetensors")
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.txt", *(f"vae/{p}" for p in VAE_PATTERNS))
TINY = "tiny"  # --model tiny: a random checkpoint made on the spot


def allow_patterns(subfolder: str | None = None) -> list[str]:
    """snapshot_download patterns: a whole model repo, or only the VAE in its `subfolder` (e.g. "vae")."""
    return [f"{subfolder}/{p}" for p in VAE_PATTERNS] if subfolder else list(MODEL_PATTERNS)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no", "off")


def download_repo(repo_id: str, local_dir: str, subfolder: str | None = None) -> str:
    """Fetch `repo_id` (or its `subfolder`) into `local_dir`, resuming partial files; returns `local_dir`.

    Raises NextStepError saying where to put the files by hand when offline or when the download fails.
    """
    url = f"https://huggingface.co/{repo_id}"
    by_hand = (f"Download {url} yourself (config.json, the *.safetensors shards with their index, the tokenizer files "
               f"and vae/) into {local_dir}, then load that folder.")
    if _offline():
        raise NextStepError(f"Cannot download {url}: HF_HUB_OFFLINE is set. {by_hand}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise NextStepError(f"Cannot download {url}: the huggingface_hub package is not installed "
                            f"(pip install huggingface_hub). {by_hand}") from None
    print(f"downloading {url} into {local_dir} ...", file=sys.stderr)
    try:
        snapshot_download(repo_id=repo_id, local_dir=local_dir, allow_patterns=allow_patterns(subfolder))
    except Exception as e:  # network, auth and disk errors all end the same way for the user
        why = (str(e).splitlines() or [""])[0][:200]
        raise NextStepError(f"Cannot download {url} ({type(e).__name__}: {why}). {by_hand}") from None
    record_download(local_dir, repo_id)
    return local_dir


def record_download(folder: str, repo_id: str) -> None:
    """Note in `folder` which Hugging Face repo it holds (read back by identify.recorded_repo)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, DOWNLOAD_MARKER), "w", encoding="utf-8") as f:
        json.dump({"repo_id": repo_id}, f)


def is_repo_id(spec: str) -> bool:
    """`owner/name`, as Hugging Face spells repositories (never a path: no leading '.', '/' or '~')."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and all(spec.split("/"))


def resolve_model(spec: str, download_dir: str | None = None) -> str:
    """--model: a local folder or file as is (with ~ expanded), `tiny` -> a random tiny checkpoint, `owner/name` ->
    that Hugging Face repo, downloaded into `download_dir` (default models/nextstep/<name>) unless already there.

    A VAE given here is refused with the advice to pass it as the VAE.
    """
    if spec == TINY:
        return _tiny_checkpoint()
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        if kind_of_path(path) == VAE:
            raise wrong_kind(path, MODEL, VAE)
        return path
    if is_repo_id(spec):
        local_dir = os.path.expanduser(download_dir or os.path.join("models", "nextstep", spec.split("/")[1]))
        if not os.path.isfile(os.path.join(local_dir, "config.json")):
            return download_repo(spec, local_dir)
        if not os.path.isfile(os.path.join(local_dir, DOWNLOAD_MARKER)):
            record_download(local_dir, spec)  # the user named the repo: worth keeping for the family
        return local_dir
    raise NextStepError(f"{path} does not exist (and is not a Hugging Face repo id like stepfun-ai/NextStep-1-Large).")


def _tiny_checkpoint() -> str:
    import tempfile

    from .testing import make_tiny_checkpoint

    path = os.path.join(tempfile.gettempdir(), "nextstep-tiny-checkpoint")
    if not os.path.isfile(os.path.join(path, "vae", "checkpoint.pt")):
        make_tiny_checkpoint(path)
    print(f"using a random tiny checkpoint in {path} (its images are noise, by design)", file=sys.stderr)
    return path
