"""`python -m nextstep_core info | generate | convert` end to end on a tiny checkpoint."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "nextstep_core", *args], capture_output=True, text=True, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_generate_writes_numbered_images_and_latents(tiny_dir, tmp_path):
    out = tmp_path / "img.png"
    r = cli("generate", "--model", tiny_dir, "--prompt", "a cat", "--prompt", "a dog", "--images-per-prompt", "2",
            "--width", "48", "--height", "32", "--steps", "3", "--dtype", "float32", "--seed", "5",
            "-o", str(out), "--save-latents", str(tmp_path / "l.npz"))
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
    assert files == [f"img_{i:03d}.png" for i in range(4)]
    assert Image.open(tmp_path / files[0]).size == (48, 32)
    z = np.load(tmp_path / "l.npz")
    assert z["tokens"].shape == (4, 6, 64) and z["latents"].shape == (4, 16, 4, 6)
    assert "tokens" in r.stderr and "tok/s" in r.stderr


def test_generate_edit(tiny_dir, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(src)
    cli("generate", "--model", tiny_dir, "--prompt", "<image>make it blue", "--edit-image", str(src), "--width", "32",
        "--height", "32", "--steps", "2", "--cfg-img", "2", "-o", str(tmp_path / "e.png"), "--noise", "reference")
    assert Image.open(tmp_path / "e.png").size == (32, 32)


def test_generate_on_the_builtin_tiny_model(tmp_path):
    r = cli("generate", "--model", "tiny", "--prompt", "x", "--width", "32", "--height", "32", "--steps", "4",
            "--steps-end", "2", "--fast", "eager", "-o", str(tmp_path / "t.png"))
    assert "noise, by design" in r.stderr and os.path.isfile(tmp_path / "t.png")


def test_bad_input_exits_nonzero_with_one_clear_line(tiny_dir, tmp_path):
    r = cli("generate", "--model", tiny_dir, "--prompt", "x", "--width", "50", "-o", str(tmp_path / "x.png"),
            check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: width 50")
    r = cli("generate", "--model", tiny_dir, "--prompt", "<image>x", "--edit-image", str(tmp_path / "missing.png"),
            "-o", str(tmp_path / "x.png"), check=False)
    assert r.returncode == 2 and "cannot read the edit image" in r.stderr


def test_info_describes_models_and_vaes(tiny_dir):
    out = cli("info", tiny_dir).stdout
    assert "family:      nextstep-1" in out and "model-00001-of-00002.safetensors" in out and "parameters:" in out
    assert "NextStep VAE" in cli("info", os.path.join(tiny_dir, "vae")).stdout


def test_info_fails_with_the_error(tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(tiny_dir, d)
    os.remove(d / "model-00001-of-00002.safetensors")
    r = cli("info", str(d), check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {d}/model-00001-of-00002.safetensors is missing. Download every shard " \
                               "listed in model.safetensors.index.json."


def test_offline_repo_id_gives_download_advice(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nextstep_core", "generate", "--model", "stepfun-ai/NextStep-1-Large",
                        "--prompt", "x", "--download-dir", str(tmp_path / "dl")], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 2
    assert "Cannot download https://huggingface.co/stepfun-ai/NextStep-1-Large" in r.stderr
    assert str(tmp_path / "dl") in r.stderr
