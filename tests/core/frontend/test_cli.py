"""`python -m nextstep_core info | generate | convert` end to end on a tiny checkpoint."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


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


def test_head_loop_and_compile_flags_reach_the_settings(tiny_dir, tmp_path, monkeypatch):
    from nextstep_core.frontend import cli as C
    from nextstep_core.generation import loop as generation

    seen = []
    real = generation.sample
    monkeypatch.setattr(generation, "sample", lambda m, c, s, **k: seen.append(s) or real(m, c, s, **k))
    args = ["generate", "--model", tiny_dir, "--prompt", "x", "--width", "16", "--height", "16", "--steps", "2",
            "--dtype", "float32", "--head-loop", "plain", "--compile", "off", "-o", str(tmp_path / "p.png")]
    assert C.main(args) == 0
    assert seen[-1].head_loop == "plain" and seen[-1].compile == "off"
    assert C.main(args[:-6] + ["-o", str(tmp_path / "f.png")]) == 0
    assert seen[-1].head_loop == "fused"  # the default


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
    assert r.returncode == 2 and "cannot read the image" in r.stderr and "no such file" in r.stderr


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


# --- every input is checked before any weight is read -------------------------------------------------------------

def run_main(capsys, *argv) -> tuple[int, str, str]:
    from nextstep_core.frontend.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args,expected", [
    (["--cfg", "nan"], "cfg must be a finite number above 0, got nan"),
    (["--cfg", "inf"], "cfg must be a finite number above 0, got inf"),
    (["--cfg-img", "-1"], "cfg_img must be a finite number above 0"),
    (["--timesteps-shift", "0"], "timesteps_shift must be a finite number above 0, got 0.0"),
    (["--width", "50"], "width 50 is not supported"),
    (["--height", "0"], "height 0 is not supported"),
    (["--steps", "0"], "steps must be a whole number from 1"),
    (["--steps-end", "0"], "steps_end must be a whole number from 1"),
    (["--images-per-prompt", "0"], "images per prompt must be a whole number from 1"),
    (["--seed", "-1"], "seed must be a whole number from 0 to 18446744073709551615, got -1"),
    (["--seed", str(2**64)], "seed must be a whole number from 0 to 18446744073709551615"),
    (["--device", "gpu0"], "device 'gpu0' is not a device name"),
    (["--device", "cuda:x"], "is not a device name"),
    (["-o", "out.xyz"], "'.xyz' is not an image file type Pillow can write"),
    (["--save-latents", "lat.txt"], "give a .npz file name"),
    (["--prompt", "<image>a cat"], "marks an input image: pass one with --edit-image"),
    (["--negative", "<|image_placeholder|>"], "--negative contains <|image_placeholder|>: the image layout's own"),
    (["--prompt", "a <|begin_of_image|> cat"], "prompt 1 contains <|begin_of_image|>"),
    (["--positive", "<|image_area|>4*4"], "--positive contains <|image_area|>"),
])
def test_a_bad_value_is_one_line_before_loading(tiny_dir, tmp_path, monkeypatch, capsys, no_loading, args, expected):
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--model", tiny_dir, *(["--prompt", "x"] if "--prompt" not in args else []), *args]
    t0 = time.process_time()  # CPU time: the shared test machines make wall time noisy
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and expected in one_error_line(err)
    assert time.process_time() - t0 < 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it(tiny_dir, tmp_path, capsys, no_loading):
    code, _, err = run_main(capsys, "generate", "--model", tiny_dir, "--prompt", "x", "--device", "cuda",
                            "-o", str(tmp_path / "x.png"))
    assert code == 2 and "'cuda' is not available on this machine" in one_error_line(err) and "cpu" in err


def test_bad_output_paths(tiny_dir, tmp_path, capsys, no_loading):
    (tmp_path / "a_file").write_text("")
    for out, expected in ((tmp_path / "a_file" / "x.png", "cannot write into"),
                          (tmp_path, "is a folder; give a file name inside it"),
                          (tmp_path / "x.npz", "'.npz' is not an image file type")):
        code, _, err = run_main(capsys, "generate", "--model", tiny_dir, "--prompt", "x", "-o", str(out))
        assert code == 2 and expected in one_error_line(err)


def test_bad_edit_images(tiny_dir, tmp_path, capsys, no_loading):
    Image.new("RGB", (40, 32)).save(tmp_path / "odd.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "text.png").write_text("hello")
    Image.new("1", (9472, 9472)).save(tmp_path / "huge.png")  # 261 KB took 21 s and 3.4 GB before its refusal
    for images, expected in ((["odd.png"], "is 40x32; editing needs sides that are multiples of 16"),
                             (["huge.png"], "huge.png is 9472x9472; no side may be above 4096 pixels"),
                             (["ok.png", "ok.png"], "2 input image(s) for 1 prompt(s)"),
                             (["text.png"], "not an image format Pillow knows")):
        edit = [a for name in images for a in ("--edit-image", str(tmp_path / name))]
        code, _, err = run_main(capsys, "generate", "--model", tiny_dir, "--prompt", "x", *edit,
                                "-o", str(tmp_path / "x.png"))
        assert code == 2 and expected in one_error_line(err)


def test_invalid_utf8_in_a_prompt(tiny_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "nextstep_core", "generate", "--model", tiny_dir, "--prompt",
                        b"caf\xe9 au lait", "-o", str(tmp_path / "x.png")], capture_output=True, cwd=ROOT)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and "Traceback" not in err
    assert err.strip() == "error: prompt 1 is not valid UTF-8 text (byte 0xe9 at character 4): set your " \
                          "terminal to UTF-8, or pass the text in UTF-8."


# --- what a run writes ---------------------------------------------------------------------------------------------

def test_images_are_written_whole_and_their_paths_printed(tiny_dir, tmp_path, capsys):
    code, out, _ = run_main(capsys, "generate", "--model", tiny_dir, "--prompt", "x", "--width", "32", "--height",
                            "16", "--steps", "2", "--dtype", "float32", "-o", str(tmp_path / "new" / "pic"),
                            "--save-latents", str(tmp_path / "new" / "z.npz"))
    assert code == 0
    assert out.splitlines() == [f"wrote {tmp_path / 'new' / 'pic.png'}", f"wrote {tmp_path / 'new' / 'z.npz'}"]
    assert sorted(os.listdir(tmp_path / "new")) == ["pic.png", "z.npz"]  # no temporary files left behind
    assert Image.open(tmp_path / "new" / "pic.png").format == "PNG"
    code, out, _ = run_main(capsys, "generate", "--model", tiny_dir, "--prompt", "x", "--width", "16", "--height",
                            "16", "--steps", "1", "-o", str(tmp_path / "pic.jpg"))
    assert code == 0 and Image.open(tmp_path / "pic.jpg").format == "JPEG"


def test_edit_images_go_through_the_engines_reader(tiny_dir, tmp_path, capsys):
    """A 16-bit grayscale PNG gives the same edit as its 8-bit RGB twin (it used to be clipped to white)."""
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray(np.repeat((ramp / 257).round().astype(np.uint8)[..., None], 3, 2)).save(tmp_path / "rgb8.png")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "white.png")
    tokens = {}
    for name in ("g16", "rgb8", "white"):
        code, _, err = run_main(capsys, "generate", "--model", tiny_dir, "--prompt", "make it blue", "--edit-image",
                                str(tmp_path / f"{name}.png"), "--width", "16", "--height", "16", "--steps", "2",
                                "--dtype", "float32", "--cfg", "1", "--cfg-img", "2", "-o",
                                str(tmp_path / f"{name}_out.png"), "--save-latents", str(tmp_path / f"{name}.npz"))
        assert code == 0, err
        tokens[name] = np.load(tmp_path / f"{name}.npz")["tokens"]
    same = np.abs(tokens["g16"] - tokens["rgb8"]).max()
    assert same < 0.1 * np.abs(tokens["g16"] - tokens["white"]).max()


def test_the_largest_seed_with_several_images(tiny_dir, tmp_path, capsys):
    """Image i is seeded with seed + i, which wraps past 2**64 - 1 instead of overflowing."""
    code, out, err = run_main(capsys, "generate", "--model", tiny_dir, "--prompt", "x", "--seed", str(2**64 - 1),
                              "--images-per-prompt", "2", "--width", "16", "--height", "16", "--steps", "1",
                              "-o", str(tmp_path / "s.png"))
    assert code == 0, err
    assert len(out.splitlines()) == 2


def test_the_tiny_demo_is_small_by_default(tmp_path, capsys):
    code, out, err = run_main(capsys, "generate", "--model", "tiny", "--prompt", "x", "-o", str(tmp_path / "t.png"))
    assert code == 0 and "tiny demo: 128x128, 8 head steps" in err
    assert out.strip() == f"wrote {tmp_path / 't.png'}" and Image.open(tmp_path / "t.png").size == (128, 128)


@pytest.mark.parametrize("native_bf16", [False, True], ids=["avx2-like cpu", "avx512-bf16 cpu"])
def test_the_dtype_defaults_to_auto_which_follows_the_devices_bf16_arithmetic(tiny_dir, tmp_path, monkeypatch,
                                                                              no_loading, native_bf16):
    from nextstep_core.frontend import cli as C

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    argv = ["generate", "--model", tiny_dir, "--prompt", "x", "--device", "cpu", "-o", str(tmp_path / "x.png")]
    args = C.build_parser().parse_args(argv)
    assert args.dtype == "auto"
    assert C._check(args).dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    assert C._check(C.build_parser().parse_args([*argv, "--dtype", "bfloat16"])).dtype == torch.bfloat16


# --- Ctrl-C and unsafe files ---------------------------------------------------------------------------------------

def fake_torch(tmp_path, body: str) -> dict:
    """An environment whose `import torch` runs `body` (to interrupt it deterministically)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(body)
    return dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")


def test_ctrl_c_while_torch_imports_prints_one_line(tmp_path):
    env = fake_torch(tmp_path, "raise KeyboardInterrupt\n")
    r = subprocess.run([sys.executable, "-m", "nextstep_core", "info", "x"], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    assert r.returncode == 130 and r.stderr.strip() == "interrupted", r.stderr


def test_a_real_sigint_during_the_torch_import(tmp_path):
    env = fake_torch(tmp_path, "import sys, time\nprint('importing', file=sys.stderr, flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-m", "nextstep_core", "generate", "--model", "tiny", "--prompt", "x"],
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert p.stderr.readline().strip() == "importing"
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=30) == 130 and rest.strip() == "interrupted", rest


def test_a_pickled_checkpoint_with_objects_is_refused_with_advice(tiny_dir, tmp_path):
    import shutil

    vae = tmp_path / "vae"
    shutil.copytree(os.path.join(tiny_dir, "vae"), vae)
    (tmp_path / "mk.py").write_text("import sys, torch\nclass Payload: pass\n"
                                    "torch.save({'w': torch.ones(1), 'x': Payload()}, sys.argv[1])\n")
    subprocess.run([sys.executable, str(tmp_path / "mk.py"), str(vae / "checkpoint.pt")], check=True)
    r = cli("info", str(vae), check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "holds Python objects besides tensors (it names __main__.Payload)" in r.stderr
    assert "Download the file again" in r.stderr and "weights_only" not in r.stderr
