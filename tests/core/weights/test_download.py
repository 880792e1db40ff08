"""The one download module (used by the CLI and the nodes) and how `--model` is resolved. Nothing is downloaded:
`huggingface_hub.snapshot_download` is replaced in every test that could reach it."""
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest

from nextstep_core.weights import download
from nextstep_core.errors import CheckpointError, NextStepError
from nextstep_core.weights.identify import recorded_repo
from nextstep_core.weights.testing import write_official_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture
def hub(monkeypatch, tiny_dir):
    """A stand-in snapshot_download that 'downloads' the tiny checkpoint, official config, and records its calls."""
    calls = []

    def snapshot_download(repo_id, local_dir, allow_patterns):
        calls.append(dict(repo_id=repo_id, local_dir=local_dir, allow_patterns=allow_patterns))
        shutil.copytree(tiny_dir, local_dir, dirs_exist_ok=True)
        write_official_config(local_dir)
        return local_dir

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_one_pattern_list_fetches_what_loading_reads():
    model = download.allow_patterns()
    assert {"*.json", "*.safetensors", "*.txt", "vae/*.json", "vae/*.pt", "vae/*.safetensors"} == set(model)
    assert download.allow_patterns("vae") == ["vae/*.json", "vae/*.pt", "vae/*.safetensors"]


def test_a_download_records_its_repo_for_the_family(hub, tmp_path):
    dest = str(tmp_path / "anything")
    assert download.download_repo("stepfun-ai/NextStep-1.1", dest) == dest
    assert hub == [dict(repo_id="stepfun-ai/NextStep-1.1", local_dir=dest, allow_patterns=download.allow_patterns())]
    assert recorded_repo(dest) == "stepfun-ai/NextStep-1.1"
    from nextstep_core.weights.loading import read_model_config

    assert read_model_config(dest)[0].family == "nextstep-1.1"


def test_offline_and_failed_downloads_say_where_to_put_the_files(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NextStepError, match=r"Cannot download https://huggingface.co/stepfun-ai/NextStep-1-Large: "
                                            r"HF_HUB_OFFLINE is set\. Download .* into " + str(tmp_path)):
        download.download_repo("stepfun-ai/NextStep-1-Large", str(tmp_path / "x"))
    assert hub == []
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def broken(**kw):
        raise OSError("Network is unreachable\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(NextStepError, match=r"\(OSError: Network is unreachable\)\. Download"):
        download.download_repo("stepfun-ai/NextStep-1-Large", str(tmp_path / "x"))
    assert recorded_repo(str(tmp_path / "x")) is None


def test_model_specs(hub, tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_dir, tmp_path / "mine")
    assert download.resolve_model("~/mine") == str(tmp_path / "mine")  # ~ first: never taken for a repo id
    with pytest.raises(NextStepError, match=f"{tmp_path}/nope does not exist"):
        download.resolve_model("~/nope")
    assert hub == []
    dest = str(tmp_path / "dl")
    assert download.resolve_model("stepfun-ai/NextStep-1-Large", dest) == dest and len(hub) == 1
    os.remove(os.path.join(dest, "nextstep_download.json"))
    assert download.resolve_model("stepfun-ai/NextStep-1-Large", dest) == dest and len(hub) == 1  # already there
    assert recorded_repo(dest) == "stepfun-ai/NextStep-1-Large"  # the repo the user named is kept


def test_a_vae_given_as_the_model_is_named_as_such(tiny_dir):
    with pytest.raises(CheckpointError, match=r"vae is a VAE \(the f8ch16 tokenizer\), not the model: load it as "
                                              r"the VAE \(--vae"):
        download.resolve_model(os.path.join(tiny_dir, "vae"))


def test_the_cli_expands_home_and_names_a_vae_given_as_the_model(tiny_dir, tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    shutil.copytree(tiny_dir, tmp_path / "NextStep-1-Large")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "nextstep_core", "generate", "--prompt", "x", "--width", "16",
                               "--height", "16", "--steps", "2", "-o", str(tmp_path / "o.png"), *args],
                              capture_output=True, text=True, cwd=ROOT, env=env)

    r = run("--model", "~/NextStep-1-Large/vae")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}/NextStep-1-Large/vae is a VAE (the f8ch16 tokenizer), not the model")
    assert "vae/ folder" not in r.stderr
    r = run("--model", "~/NextStep-1-Large")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "o.png")
