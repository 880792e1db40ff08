"""The family of a checkpoint on disk: configs as StepFun's own code writes them, in folders with published and with
anonymous names, `_name_or_path`, the download record, our metadata key, and an explicit family over all of them.

The end-to-end case is the one issue 9 is about: a checkpoint whose config.json the official NextStep-1 code wrote,
in a folder named NextStep-1-Large, must generate NextStep-1's images with no flags.
"""
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nextstep_core import load_model
from nextstep_core.weights.convert import convert
from nextstep_core.weights.download import record_download
from nextstep_core.frontend.info import describe
from nextstep_core.weights.loading import read_model_config
from nextstep_core.weights.testing import write_official_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
GOLDEN = os.path.join(ROOT, "tests", "core", "golden")
HINT = "--family nextstep-1|nextstep-1.1"


@pytest.fixture
def official(tiny_dir, tmp_path):
    """official(name, **config) -> a copy of the tiny checkpoint in tmp/<name> with an official-style config.json."""
    def make(name, **config):
        d = tmp_path / name
        shutil.copytree(tiny_dir, d)
        return write_official_config(str(d), **config)
    return make


def family_of(path, family="auto"):
    cfg, _ = read_model_config(path, family)
    return cfg.family, cfg.family_reason, cfg.family_guessed


@pytest.mark.parametrize("name, expected", [
    ("NextStep-1-Large", "nextstep-1"), ("NextStep-1-Large-Edit", "nextstep-1"),
    ("NextStep-1-Large-Pretrain", "nextstep-1"), ("NextStep-1.1", "nextstep-1.1"),
    ("NextStep-1.1-Pretrain-256px", "nextstep-1.1"),
])
def test_published_folder_names_decide(official, name, expected):
    assert family_of(official(name)) == (expected, f"from the folder name {name!r}", False)


def test_the_1_1_layout_in_its_published_folder_is_1_1(official):
    # the HF NextStep-1.1 config: the same NextStepConfig fields, plus the grid size, vae/ beside the model
    d = official("NextStep-1.1", base_image_grid_size=32, use_gen_pos_embed=False)
    assert family_of(d)[0] == "nextstep-1.1"


def test_an_anonymous_folder_is_a_default_that_says_how_to_override(official):
    fam, reason, guessed = family_of(official("my-model"))
    assert (fam, guessed) == ("nextstep-1", True) and reason.startswith("the default")
    fam, reason, guessed = family_of(official("other", base_image_grid_size=32))  # 1.1's layout, anonymous: unknown
    assert (fam, guessed) == ("nextstep-1", True)


def test_name_or_path_names_an_anonymous_folder(official):
    assert family_of(official("my-model", name_or_path="stepfun-ai/NextStep-1.1"))[:2] == (
        "nextstep-1.1", "from the config's _name_or_path 'stepfun-ai/NextStep-1.1'")


def test_the_download_record_survives_renaming_and_beats_the_folder_name(official, tmp_path):
    d = official("NextStep-1.1")
    record_download(d, "stepfun-ai/NextStep-1.1")
    renamed = str(tmp_path / "renamed")
    os.rename(d, renamed)
    assert family_of(renamed) == ("nextstep-1.1", "from the Hugging Face repo it was downloaded from "
                                                  "'stepfun-ai/NextStep-1.1'", False)
    record_download(renamed, "stepfun-ai/NextStep-1-Large")
    os.rename(renamed, tmp_path / "NextStep-1.1")
    fam, reason, guessed = family_of(str(tmp_path / "NextStep-1.1"))
    assert fam == "nextstep-1" and guessed and "the folder name 'NextStep-1.1' suggests nextstep-1.1" in reason


def test_a_hugging_face_cache_snapshot_is_named_by_its_repo(tiny_dir, tmp_path):
    d = tmp_path / "models--stepfun-ai--NextStep-1-Large" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_dir, d)
    write_official_config(str(d))
    assert family_of(str(d))[:2] == ("nextstep-1", "from the Hugging Face repo it was downloaded from "
                                                   "'stepfun-ai/NextStep-1-Large'")


def test_our_key_beats_names_and_an_explicit_family_beats_everything(tiny_dir, tmp_path, official):
    d = tmp_path / "NextStep-1-Large"
    shutil.copytree(tiny_dir, d)  # the maker's config carries nextstep_family: nextstep-1 ...
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, nextstep_family="nextstep-1.1")))  # ... now 1.1
    assert family_of(str(d)) == ("nextstep-1.1", "from nextstep_family in config.json", False)
    assert family_of(str(d), "nextstep-1") == ("nextstep-1", "set explicitly", False)
    assert load_model(official("NextStep-1.1"), dtype="float32", family="nextstep-1").config.family == "nextstep-1"


def test_convert_writes_the_resolved_family_with_its_reason(official, tmp_path):
    f = convert(official("NextStep-1-Large"), str(tmp_path / "renamed-NextStep-1.1-ish.safetensors"), "fp32")
    assert family_of(f) == ("nextstep-1", "from nextstep_family in the file's metadata; recorded there: from the "
                                          "folder name 'NextStep-1-Large'", False)
    g = convert(official("anon"), str(tmp_path / "forced.safetensors"), "fp32", family="nextstep-1.1")
    assert family_of(g)[:2] == ("nextstep-1.1", "from nextstep_family in the file's metadata; recorded there: set "
                                                "explicitly")
    h = convert(g, str(tmp_path / "again.safetensors"), "fp32")  # converting a converted file keeps the record
    assert family_of(h) == family_of(g)


def test_the_loader_logs_the_decision_once(official, caplog):
    with caplog.at_level(logging.INFO, logger="nextstep"):
        load_model(official("NextStep-1-Large"), dtype="float32")
    lines = [r for r in caplog.records if "family:" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert lines[0].getMessage().endswith("family: nextstep-1 (from the folder name 'NextStep-1-Large')")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nextstep"):
        load_model(official("anon"), dtype="float32")
    lines = [r for r in caplog.records if "family:" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and HINT in lines[0].getMessage()


# ---- end to end, through the command line ---------------------------------------------------------------------

def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "nextstep_core", *args], capture_output=True, text=True, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_info_prints_the_family_and_the_rule(official):
    out = cli("info", official("NextStep-1-Large")).stdout
    assert "  family:      nextstep-1 (from the folder name 'NextStep-1-Large')\n" in out and HINT not in out
    out = cli("info", official("anon")).stdout
    assert "family:      nextstep-1 (the default" in out and HINT in out
    assert "family:      nextstep-1.1 (set explicitly)" in describe(official("x"), family="nextstep-1.1")


def test_info_names_model_type_stepx_llama_as_the_reason_for_1_1(official):
    out = cli("info", official("anon", model_type="stepx_llama")).stdout
    assert "family:      nextstep-1.1 (from model_type 'stepx_llama' in config.json" in out and HINT not in out


def _generate(model, tmp_path, tag, *extra):
    """Golden case t2i_norm_linear (the family decides the sampler, its time grid and the linear schedule)."""
    case = next(c for c in json.load(open(os.path.join(GOLDEN, "cases.json"))) if c["name"] == "t2i_norm_linear")
    h, w = case["hw"]
    r = cli("generate", "--model", model, "--prompt", case["captions"][0], "--positive", "", "--negative", "",
            "--width", str(w), "--height", str(h), "--cfg", str(case["cfg"]), "--cfg-schedule", case["cfg_schedule"],
            "--timesteps-shift", str(case["timesteps_shift"]), "--steps", str(case["num_sampling_steps"]),
            "--use-norm", "--seed", str(case["seed"]), "--noise", "reference", "--dtype", "float32",
            "-o", str(tmp_path / f"{tag}.png"), "--save-latents", str(tmp_path / f"{tag}.npz"), *extra)
    return r, np.load(tmp_path / f"{tag}.npz")["tokens"], np.asarray(Image.open(tmp_path / f"{tag}.png"), dtype=int)


def test_an_official_nextstep1_checkpoint_named_nextstep_1_large_generates_nextstep1_images(official, tmp_path):
    golden = np.load(os.path.join(GOLDEN, "reference_tiny.npz"))
    tokens_ref, image_ref = golden["t2i_norm_linear/tokens"], golden["t2i_norm_linear/images"][0].astype(int)
    model = official("NextStep-1-Large")
    r, tokens, image = _generate(model, tmp_path, "auto")  # no flags
    assert HINT not in r.stderr  # decided by the name: no warning
    assert np.abs(tokens - tokens_ref).max() < 1e-4 and np.abs(image - image_ref).max() <= 2
    _, tokens_11, _ = _generate(model, tmp_path, "v11", "--family", "nextstep-1.1")
    assert np.abs(tokens_11 - tokens_ref).max() > 0.1  # the test can tell the families apart
