"""AutoRound / GPTQ W4A16 folders, checked against tensors the real `auto-round` package packed (fixtures/autoround,
made by its make_fixtures.py): our unpacking gives the producer's own dequantised weights bit for bit, our int4 layout
holds the same codes within the documented bound of its bfloat16 table, and a tiny NextStep in that layout loads,
describes itself, converts and generates the tokens of our int4 path on the same codes."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import nextstep_core as ns
from nextstep_core.errors import CheckpointError
from nextstep_core.frontend.info import describe
from nextstep_core.weights import gptq, quant_int4
from nextstep_core.weights.convert import TensorReader, convert
from nextstep_core.weights.identify import MODEL, kind_of_path, resolve_family
from nextstep_core.weights.loading import model_source, scan_safetensors
from tests.core.fixtures.autoround.folder import FIXTURES, PUBLISHED_NAME, make_w4a16_folder

LAYERS = load_file(os.path.join(FIXTURES, "layers.safetensors"))
with open(os.path.join(FIXTURES, "layers.json")) as _f:
    CONFIGS = json.load(_f)
CASES = sorted(c for c in CONFIGS if f"{c}.reference" in LAYERS)  # AWQ has no GPTQ-layout reference
MAPPING = [c for c in CASES if CONFIGS[c]["group_size"] != 32]  # groups of 128, 256 and per row fit our int4


def case(name):
    """(format, {tensor: value}) of one fixture layer, as AutoRound wrote it."""
    fmt = gptq.packed_format({"quantization_config": CONFIGS[name]}, name)
    return fmt, {k.split(".", 1)[1]: v for k, v in LAYERS.items() if k.startswith(name + ".")}


def codes_and_zeros(fmt, t):
    return gptq.unpack_rows(t["qweight"]).t(), gptq.zero_points(t["qzeros"], fmt.zero_offset)


@pytest.mark.parametrize("name", CASES)
def test_dequantised_weights_equal_the_producers_own_dequantisation_bit_for_bit(name):
    fmt, t = case(name)
    ours = gptq.dequantize(t["qweight"], t["scales"], gptq.zero_points(t["qzeros"], fmt.zero_offset))
    assert ours.dtype == torch.float32 and ours.shape == t["reference"].shape
    assert torch.equal(ours.half(), t["reference"])  # the producer multiplies in fp16: the exact product, rounded


@pytest.mark.parametrize("name", [c for c in CASES if CONFIGS[c].get("packing_format") != "auto_round:gptqmodel"])
def test_gptq_v1_packing_stores_zero_points_minus_one(name):
    fmt, t = case(name)
    assert fmt.zero_offset == 1
    wrong = gptq.dequantize(t["qweight"], t["scales"], gptq.zero_points(t["qzeros"], 0))
    assert not torch.equal(wrong.half(), t["reference"])


def test_symmetric_groups_have_zero_point_8():
    fmt, t = case("sym_g128")
    assert torch.equal(gptq.zero_points(t["qzeros"], fmt.zero_offset), torch.full((32, 2), 8, dtype=torch.int32))


@pytest.mark.parametrize("name", MAPPING)
def test_our_int4_layout_holds_the_same_codes_and_is_within_the_bound_of_its_bfloat16_table(name):
    fmt, t = case(name)
    q, z = codes_and_zeros(fmt, t)
    nibbles = gptq.int4_weight(t["qweight"])
    scale, zero = gptq.int4_table(t["scales"], z, 256)
    assert torch.equal(quant_int4.unpack_nibbles(nibbles), q)  # codes moved, never changed
    assert scale.shape == zero.shape == (32, 2) and scale.dtype == zero.dtype == torch.bfloat16
    ours = quant_int4.dequantize(nibbles, scale, zero, torch.float32)
    exact = gptq.dequantize(t["qweight"], t["scales"], z)
    group = 256 // z.shape[1]
    s = t["scales"].t().float().repeat_interleave(group, 1)
    zz = z.repeat_interleave(group, 1).float()
    # bfloat16 keeps 8 significant bits: s and s * (8 - z) are each off by at most 2^-8 of themselves
    bound = 2.0**-8 * s.abs() * ((q.float() - 8).abs() + (8 - zz).abs())
    assert ((ours - exact).abs() <= bound).all()
    assert ((ours - t["reference"].float()).abs() <= bound + 2.0**-11 * exact.abs()).all()  # + the fp16 rounding


def test_symmetric_groups_whose_scale_is_a_bfloat16_number_are_exact():
    fmt, t = case("sym_g128")
    q, z = codes_and_zeros(fmt, t)
    scale, zero = gptq.int4_table(t["scales"], z, 256)
    assert not zero.any()  # z = 8: zero 0, exactly
    exact_scale = (t["scales"].t().float() == t["scales"].t().bfloat16().float()).repeat_interleave(128, 1)
    assert exact_scale.any() and not exact_scale.all()
    ours = quant_int4.dequantize(gptq.int4_weight(t["qweight"]), scale, zero, torch.float32)
    exact = gptq.dequantize(t["qweight"], t["scales"], z)
    assert torch.equal(ours[exact_scale], exact[exact_scale])
    assert not torch.equal(ours, exact)


def one_layer_folder(tmp_path, name):
    """A Source over one fixture layer stored as `layers.0.mlp.down_proj` (no model around it)."""
    _, t = case(name)
    path = str(tmp_path / "layer.safetensors")
    save_file({f"layers.0.mlp.down_proj.{k}": v for k, v in t.items() if k != "reference"}, path)
    return scan_safetensors([path], str(tmp_path), "folder")


def test_groups_smaller_than_128_are_refused_at_load_and_dequantised_exactly_for_convert(tmp_path):
    fmt, t = case("sym_g32")
    src = one_layer_folder(tmp_path, "sym_g32")
    checkpoint = gptq.PackedCheckpoint(src, fmt, gptq.packed_layers(src.shapes, fmt, str(tmp_path)))
    with pytest.raises(CheckpointError, match="group_size = 32.*convert"):
        checkpoint.check_loadable()
    assert "1 of them (e.g. layers.0.mlp.down_proj) do not fit int4 groups of 128" in "\n".join(checkpoint.describe())
    view = checkpoint.view(keep_int4=True)
    assert view.dtypes["layers.0.mlp.down_proj.weight"] == "F32"
    assert torch.equal(view.reader.get("layers.0.mlp.down_proj.weight").half(), t["reference"])


@pytest.mark.parametrize("name", ["gptq_asym_g128", "gptqmodel_asym_g128"])
def test_act_order_g_idx_is_refused_naming_the_field(tmp_path, name):
    fmt, t = case(name)
    src = one_layer_folder(tmp_path, name)
    view = gptq.PackedCheckpoint(src, fmt, gptq.packed_layers(src.shapes, fmt, str(tmp_path))).view()
    assert view.reader.get("layers.0.mlp.down_proj.weight").shape == (32, 128)  # group-ordered g_idx: fine
    save_file({"layers.0.mlp.down_proj.g_idx": t["g_idx"].flip(0).contiguous(),
               **{f"layers.0.mlp.down_proj.{k}": v for k, v in t.items() if k not in ("reference", "g_idx")}},
              str(tmp_path / "layer.safetensors"))
    with pytest.raises(CheckpointError, match="g_idx is not in group order.*desc_act"):
        view.reader.get("layers.0.mlp.down_proj.weight")


@pytest.mark.parametrize("change,field", [
    ({"bits": 8}, "bits"), ({"bits": 2}, "bits"), ({"data_type": "mx_fp"}, "data_type"), ({"act_bits": 8}, "act_bits"),
    ({"packing_format": "auto_round:llm_compressor"}, "packing_format"), ({"quant_method": "awq"}, "quant_method"),
    ({"group_size": 0}, "group_size"), ({"extra_config": {"layers.0.mlp.up_proj": {"bits": 8}}}, "extra_config"),
    ({"quant_method": "gptq", "dynamic": {r"+:.*down_proj.*": {"bits": 8}}}, "dynamic"),
])
def test_formats_we_do_not_read_are_refused_naming_the_field(change, field):
    with pytest.raises(CheckpointError, match=rf"quantization_config\.{field}"):
        gptq.packed_format({"quantization_config": dict(CONFIGS["sym_g128"], **change)}, "config.json")


def test_awq_packing_as_autoround_writes_it_is_refused():
    with pytest.raises(CheckpointError, match=r"packing_format = 'auto_round:auto_awq'"):
        gptq.packed_format({"quantization_config": CONFIGS["awq_asym_g128"]}, "config.json")


def test_gptq_checkpoint_formats_are_read_with_their_own_zero_convention():
    base = dict(CONFIGS["gptq_asym_g128"])
    assert any(k.startswith("-:") for k in base["dynamic"])  # the layers it left dense: fine
    assert gptq.packed_format({"quantization_config": base}, "c").zero_offset == 1
    assert gptq.packed_format({"quantization_config": dict(base, checkpoint_format="gptq_v2")}, "c").zero_offset == 0
    with pytest.raises(CheckpointError, match="checkpoint_format = 'marlin'"):
        gptq.packed_format({"quantization_config": dict(base, checkpoint_format="marlin")}, "c")


# ---- a tiny NextStep in the published file's layout

@pytest.fixture(scope="module")
def w4a16_dir(tmp_path_factory):
    return make_w4a16_folder(str(tmp_path_factory.mktemp("ar") / PUBLISHED_NAME))


def tokens(model):
    settings = ns.SamplerSettings(width=32, height=32, steps=4, seed=3, cfg=3.0)
    return ns.sample(model, ns.Conditioning(["a cat"]), settings).tokens


def test_the_folder_loads_with_its_packed_layers_as_int4_and_the_family_from_its_name(w4a16_dir):
    model = ns.load_model(w4a16_dir, dtype="bfloat16")
    assert model.config.family == ns.FAMILY_V1_1 and model.quant == "int4"
    int4 = {n for n, m in model.named_modules() if getattr(m, "weight_zero", None) is not None}
    assert {"layers.1.self_attn.qkv_proj", "layers.1.mlp.gate_up_proj", "layers.0.mlp.down_proj",
            "image_head.net.res_blocks.0.adaLN_modulation.1", "image_head.net.res_blocks.0.mlp.2"} <= int4
    assert model.image_out_projector.weight_scale is None  # stored dense: stays dense
    assert not model.unexpected_keys


def test_the_folder_generates_the_tokens_of_our_int4_file_with_the_same_codes(w4a16_dir, tmp_path):
    dst = convert(w4a16_dir, str(tmp_path / "same_codes.safetensors"), dtype="int4")
    reader = TensorReader(dst)
    packed = load_file(os.path.join(FIXTURES, "tiny_w4a16", "quantized.safetensors"))
    for name in ("layers.0.self_attn.k_proj", "image_head.net.res_blocks.0.mlp.0"):
        assert torch.equal(quant_int4.unpack_nibbles(reader.get(f"{name}.weight")),
                           gptq.unpack_rows(packed[f"{name}.qweight"]).t())  # the producer's codes, unchanged
    assert "quantization_config" not in json.loads(reader.metadata["nextstep_config"])
    assert torch.equal(tokens(ns.load_model(w4a16_dir, dtype="bfloat16")), tokens(ns.load_model(dst, dtype="bfloat16")))


def test_converting_to_float_writes_the_exactly_dequantised_weights(w4a16_dir, tmp_path):
    dst = convert(w4a16_dir, str(tmp_path / "fp32.safetensors"), dtype="fp32")
    reader = TensorReader(dst)
    packed = load_file(os.path.join(FIXTURES, "tiny_w4a16", "quantized.safetensors"))
    name = "layers.1.mlp.up_proj"
    z = gptq.zero_points(packed[f"{name}.qzeros"], 1)
    exact = gptq.dequantize(packed[f"{name}.qweight"], packed[f"{name}.scales"], z)
    assert torch.equal(reader.get(f"{name}.weight"), exact)
    assert "nextstep_quant" not in reader.metadata
    assert reader.get("layers.1.self_attn.q_proj.bias").dtype == torch.float32  # the file's fp16 bias, widened
    model = ns.load_model(dst, dtype="float32")
    assert model.quant is None and model.config.family == ns.FAMILY_V1_1


def test_info_describes_the_quantisation_and_which_layers_are_packed(w4a16_dir):
    text = describe(w4a16_dir)
    assert "family:      nextstep-1.1 (from the folder name 'NextStep-1.1-W4A16-AutoRound')" in text
    assert "quantised:   auto-round (auto_round:auto_gptq), 4-bit int, groups of 128, symmetric" in text
    assert "17 linear layer(s): 14 in the decoder, 3 in the head, 0 elsewhere" in text
    assert "stored as:   F16, F32, I32" in text


def test_the_model_loader_lists_the_folder_as_a_model(w4a16_dir):
    assert kind_of_path(w4a16_dir) == MODEL


@pytest.mark.parametrize("where", [PUBLISHED_NAME, f"models--INCModel--{PUBLISHED_NAME}/snapshots/abc"])
def test_the_published_name_is_nextstep_1_1_wherever_it_is_read(tmp_path, where):
    folder = tmp_path / where
    folder.mkdir(parents=True)
    assert resolve_family({}, str(folder)).family == ns.FAMILY_V1_1


def test_a_folder_with_small_groups_says_to_convert_it(w4a16_dir, tmp_path):
    dst = str(tmp_path / PUBLISHED_NAME)
    shutil.copytree(w4a16_dir, dst)
    with open(os.path.join(dst, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"]["group_size"] = 64  # the tensors hold one group of 128: config and weights disagree
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(CheckpointError, match="group_size says 64"):
        model_source(dst)
