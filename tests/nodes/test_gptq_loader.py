"""The Model Loader with an AutoRound W4A16 folder (the published NextStep-1.1-W4A16-AutoRound's layout, from tensors
the real auto-round packed): listed, loaded as int4 with the family from its name (see conftest.py for the stand-ins)."""
from __future__ import annotations

import os

from tests.core.fixtures.autoround.folder import PUBLISHED_NAME, make_w4a16_folder


def test_the_model_loader_lists_and_loads_an_autoround_folder(pack, models_dir):
    folder = models_dir / "nextstep" / PUBLISHED_NAME
    if not os.path.isdir(folder):
        make_w4a16_folder(str(folder))
    loader = pack[0].NODE_CLASS_MAPPINGS["NextStepModelLoader"]
    assert PUBLISHED_NAME in loader.INPUT_TYPES()["required"]["model_name"][0]
    model = loader().load(PUBLISHED_NAME, "auto", "sdpa", False)[0].module
    assert model.config.family == "nextstep-1.1" and model.quant == "int4"
    assert model.layers[0].mlp.down_proj.weight_zero is not None
