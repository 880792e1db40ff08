"""Unit-test fixtures for the node classes: self-written stand-ins for the few ComfyUI modules they import.

The nodes are imported as the package ComfyUI would import (the repo root, here named `nextstep_pack`), with the
stand-ins in sys.modules, the way ComfyUI's own tests-unit patch `nodes`/`server`. The real-server behaviour is
covered by tests/comfyui; these tests pin the conversions, validation and glue logic quickly and without a server.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PACK = "nextstep_pack"


class Recorder:
    """What the nodes asked of ComfyUI."""

    def __init__(self):
        self.loads, self.progress, self.interrupt_after = [], [], None


def _folder_paths(models_dir: Path):
    m = types.ModuleType("folder_paths")
    m.models_dir = str(models_dir)
    m.folder_names_and_paths = {"vae": ([str(models_dir / "vae")], {".pt", ".safetensors"}),
                                "diffusion_models": ([str(models_dir / "diffusion_models")], {".safetensors"})}

    def add_model_folder_path(name, path, is_default=False):
        m.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)

    def get_folder_paths(name):
        return list(m.folder_names_and_paths[name][0])

    def get_filename_list(name):
        out = []
        for base in get_folder_paths(name):
            for root, _, files in os.walk(base):
                out += [os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/") for f in files]
        return sorted(out)

    def get_full_path(name, filename):
        for base in get_folder_paths(name):
            p = os.path.join(base, filename)
            if os.path.isfile(p):
                return p
        return None

    m.add_model_folder_path, m.get_folder_paths = add_model_folder_path, get_folder_paths
    m.get_filename_list, m.get_full_path = get_filename_list, get_full_path
    return m


def _comfy(rec: Recorder):
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    mm.InterruptProcessingException = InterruptProcessingException
    mm.get_torch_device = mm.unet_offload_device = mm.intermediate_device = lambda: torch.device("cpu")
    mm.should_use_bf16 = lambda device=None: False
    mm.module_size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())
    mm.load_models_gpu = lambda models, memory_required=0: rec.loads.append((models, memory_required))

    def processing_interrupted():
        return rec.interrupt_after is not None and len(rec.progress) >= rec.interrupt_after

    def throw_exception_if_processing_interrupted():
        if processing_interrupted():
            raise InterruptProcessingException()

    mm.processing_interrupted = processing_interrupted
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    patcher = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    patcher.ModelPatcher = ModelPatcher
    ops = types.ModuleType("comfy.ops")
    ops.disable_weight_init = types.SimpleNamespace(Linear=torch.nn.Linear, Conv2d=torch.nn.Conv2d,
                                                    GroupNorm=torch.nn.GroupNorm, LayerNorm=torch.nn.LayerNorm)
    ops.manual_cast = ops.disable_weight_init  # no Embedding: like the 2024 ComfyUI, torch.nn must stand in
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            rec.progress.append((value, total, preview))

    utils.ProgressBar = ProgressBar
    formats = types.ModuleType("comfy.latent_formats")  # no Flux: previews take the plain fallback
    cli = types.ModuleType("comfy.cli_args")
    cli.args = types.SimpleNamespace(preview_size=256)
    mods = {"comfy": comfy, "comfy.model_management": mm, "comfy.model_patcher": patcher, "comfy.ops": ops,
            "comfy.utils": utils, "comfy.latent_formats": formats, "comfy.cli_args": cli}
    for name, mod in mods.items():
        if "." in name:
            setattr(comfy, name.split(".", 1)[1], mod)
    return mods


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    from nextstep_core.weights import testing

    root = tmp_path_factory.mktemp("models")
    testing.make_tiny_checkpoint(str(root / "nextstep" / "NextStep-1.1"), size="tiny", seed=0, family="nextstep-1.1")
    (root / "vae").mkdir()
    (root / "diffusion_models").mkdir()
    return root


@pytest.fixture
def pack(models_dir, monkeypatch):
    """The pack imported fresh against the stand-ins; returns (package, recorder)."""
    rec = Recorder()
    for name in [n for n in sys.modules if n == PACK or n.startswith(PACK + ".")]:
        monkeypatch.delitem(sys.modules, name)
    for name, mod in {"folder_paths": _folder_paths(models_dir), **_comfy(rec)}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, PACK, module)
    spec.loader.exec_module(module)
    yield module, rec
    for name in [n for n in sys.modules if n.startswith(PACK + ".")]:
        del sys.modules[name]
