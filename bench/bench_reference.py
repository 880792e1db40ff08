"""Side by side with the official NextStep-1 pipeline on the CPU (issue 10): tokens/s of `ns.sample` vs StepFun's
`NextStepPipeline.generate_image` on the same random checkpoint, settings and seed, float32, one thread.

    python bench/bench_reference.py --reference-dir /work/refcode --reference-python /work/refvenv/bin/python

`--reference-dir` is a checkout of github.com/stepfun-ai/NextStep-1 (snapshot 6e49bae was used for the goldens);
its code is imported from there and never copied into this repository. `--reference-python` is an interpreter
that has the reference's own pins (transformers 4.49, diffusers 0.32, numpy 1.26, plus webdataset, pendulum,
loguru, omegaconf, tabulate, einops); the project's environment usually has transformers 5.x, which the reference
does not run with. See the reference notes section 13 for the run-time stand-ins used here (torchvision's three
transforms, megfile, `torch.version.cuda`), none of which changes the reference's math.

Each side runs in its own long-lived worker process (model loaded once, one warm-up generation); the driver asks
them for one image at a time, alternating A/B/A/B for every step count, and compares the images (uint8, as the
reference's PIL output). Time = wall time of one whole image: prompt encoding, prefill, every token, VAE decode.
This is a benchmark that prints numbers, never a pass/fail test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import NEGATIVE, PROMPT, REPO, checkpoint, dump_json, env_info, now, summary, table  # noqa: E402

POSITIVE = "masterpiece, film grained, best quality."
CFG = 7.5


# ---- the workers (one process per side; they answer one JSON line per request line on stdin)

def _ours(ckpt: str):
    import torch

    import nextstep_core as ns

    model = ns.load_model(ckpt, dtype="float32", device="cpu", family=ns.FAMILY_V1)
    vae = ns.load_vae(os.path.join(ckpt, "vae"))
    cond = ns.Conditioning([PROMPT], POSITIVE, NEGATIVE)

    def run(side: int, steps: int, seed: int) -> np.ndarray:
        settings = ns.SamplerSettings(width=side, height=side, cfg=CFG, steps=steps, seed=seed, use_norm=True,
                                      noise="reference", fast="eager")
        res = ns.sample(model, cond, settings)
        px = ns.decode_latents(vae, res.latents)
        return (px.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return run, {"family": model.config.family}


def _stand_ins(torch) -> None:
    """Import-time stand-ins the reference needs on a CPU-only torch (reference notes section 13)."""
    import types

    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")

    class Compose:
        def __init__(self, fns):
            self.fns = fns

        def __call__(self, x):
            for f in self.fns:
                x = f(x)
            return x

    class ToTensor:  # PIL RGB -> float CHW in 0..1
        def __call__(self, im):
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

        def __call__(self, x):
            return (x - self.mean) / self.std

    tr.Compose, tr.ToTensor, tr.Normalize = Compose, ToTensor, Normalize
    tv.transforms = tr
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tr, "megfile": types.ModuleType("megfile")})


def _reference(ckpt: str, reference_dir: str):
    import torch

    os.environ["ENABLE_TORCH_COMPILE"] = "false"
    sys.path.insert(0, os.path.abspath(reference_dir))
    import diffusers  # noqa: F401  (they probe for torchvision at import: let them find none, then stand in)
    import transformers  # noqa: F401
    _stand_ins(torch)
    cuda = torch.version.cuda
    torch.version.cuda = cuda or "0.0"  # import_utils formats this string for a log line only
    try:
        import nextstep.utils.import_utils  # noqa: F401
    finally:
        torch.version.cuda = cuda
    from nextstep.models.pipeline_nextstep import NextStepPipeline

    pipe = NextStepPipeline(model_name_or_path=ckpt, vae_name_or_path=os.path.join(ckpt, "vae"))
    pipe = pipe.to("cpu", torch.float32)

    def run(side: int, steps: int, seed: int) -> np.ndarray:
        ims = pipe.generate_image(PROMPT, hw=(side, side), positive_prompt=POSITIVE, negative_prompt=NEGATIVE,
                                  use_norm=True, cfg=CFG, cfg_schedule="constant", timesteps_shift=1.0,
                                  num_sampling_steps=steps, seed=seed, progress=False)
        return np.stack([np.asarray(im) for im in ims])
    return run, {"transformers": transformers.__version__, "diffusers": diffusers.__version__}


def worker(side_name: str, ckpt: str, reference_dir: str | None) -> None:
    import torch

    torch.set_num_threads(1)
    run, info = _ours(ckpt) if side_name == "ours" else _reference(ckpt, reference_dir)
    info.update(torch=torch.__version__, threads=torch.get_num_threads(), numpy=np.__version__)
    out = sys.stdout
    sys.stdout = sys.stderr  # only the protocol lines go to the driver
    print(json.dumps({"ready": info}), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        t0 = now()
        img = run(req["side"], req["steps"], req["seed"])
        dt = now() - t0
        np.save(req["out"], img)
        print(json.dumps({"seconds": dt}), file=out, flush=True)


# ---- the driver

class Worker:
    def __init__(self, name: str, python: str, args: list[str]):
        import subprocess

        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", ENABLE_TORCH_COMPILE="false")
        self.name = name
        self.p = subprocess.Popen([python, os.path.abspath(__file__), "--worker", name, *args], cwd=REPO, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()["ready"]

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker died (its stderr is above)")
        return json.loads(line)

    def image(self, side: int, steps: int, seed: int, out: str) -> tuple[float, np.ndarray]:
        self.p.stdin.write(json.dumps({"side": side, "steps": steps, "seed": seed, "out": out}) + "\n")
        self.p.stdin.flush()
        dt = self._read()["seconds"]
        return dt, np.load(out)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", required=True, help="checkout of github.com/stepfun-ai/NextStep-1")
    p.add_argument("--reference-python", default=sys.executable,
                   help="interpreter with the reference's pins (transformers 4.49, diffusers 0.32)")
    p.add_argument("--size", default="medium", help="random checkpoint size from nextstep_core.weights.testing")
    p.add_argument("--side", type=int, default=256)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "nextstep-bench"))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.ckpt, a.reference_dir)

    ckpt = checkpoint(a.cache, a.size)
    tokens = (a.side // 16) ** 2
    print(f"checkpoint {a.size}: {ckpt}; {a.side}x{a.side} = {tokens} tokens, cfg {CFG}, seed {a.seed}, "
          f"fp32, 1 thread per side")
    sides = {"ours": Worker("ours", sys.executable, ["--ckpt", ckpt, "--reference-dir", a.reference_dir]),
             "reference": Worker("reference", a.reference_python, ["--ckpt", ckpt, "--reference-dir",
                                                                    a.reference_dir])}
    for name, w in sides.items():
        print(f"  {name}: {w.info}")
    tmp = tempfile.mkdtemp(prefix="nextstep-refbench-")
    for name, w in sides.items():  # warm-up: first-call allocations and lazy imports stay out of the timings
        w.image(32, 2, a.seed, os.path.join(tmp, f"warm-{name}.npy"))
    results = {"env": env_info(), "workers": {k: w.info for k, w in sides.items()}, "size": a.size,
               "side": a.side, "tokens": tokens, "runs": {}}
    rows = []
    for steps in a.steps:
        secs = {k: [] for k in sides}
        imgs = {}
        for r in range(a.rounds):
            for name, w in sides.items():
                dt, imgs[name] = w.image(a.side, steps, a.seed, os.path.join(tmp, f"{name}.npy"))
                secs[name].append(dt)
                print(f"    {steps} steps, round {r + 1}/{a.rounds} {name:<9s} {dt:8.2f} s  "
                      f"{tokens / dt:6.2f} tok/s", flush=True)
        diff = int(np.abs(imgs["ours"].astype(int) - imgs["reference"].astype(int)).max())
        ratios = [o_ref / o_ours for o_ours, o_ref in zip(secs["ours"], secs["reference"])]
        rate = {k: summary([tokens / s for s in v]) for k, v in secs.items()}
        ratio = rate["ours"]["median"] / rate["reference"]["median"]
        results["runs"][str(steps)] = {"seconds": {k: summary(v) for k, v in secs.items()}, "tok_s": rate,
                                       "ratio_of_medians": ratio, "per_round_ratio": summary(ratios),
                                       "max_pixel_diff": diff, "image_shape": list(imgs["ours"].shape)}
        rows.append([steps, rate["ours"]["median"], rate["reference"]["median"], ratio,
                     f"{min(ratios):.2f}-{max(ratios):.2f}", f"{diff}/255"])
    for w in sides.values():
        w.close()
    print(table(rows, ["head steps", "ours tok/s", "official tok/s", "ours / official",
                       "per-round range", "max pixel diff"]))
    if a.json:
        dump_json(a.json, results)


if __name__ == "__main__":
    main()
