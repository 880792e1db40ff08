"""config.json -> typed configs: defaults, family detection, and clear errors for the wrong kind of file."""
import pytest

from nextstep_core.config import (FAMILY_V1, FAMILY_V1_1, detect_family, model_config_from_dict,
                                  vae_config_from_dict)
from nextstep_core.errors import CheckpointError

LARGE = {  # the fields the published NextStep-1-Large config shows (reference notes §2.1)
    "architectures": ["LlamaForCausalLM"], "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
    "num_key_value_heads": 8, "num_hidden_layers": 48, "hidden_act": "silu", "attention_bias": True, "mlp_bias": False,
    "max_position_embeddings": 131072, "bos_token_id": 151643, "eos_token_id": 151643, "boi": 151667, "eoi": 151668,
    "image_placeholder_id": 151669, "latent_channels": 16, "latent_patch_size": 2, "latent_size": 64,
    "fm_head_dim": 1536, "fm_head_layers": 12, "fm_head_batch_mul": 4, "model_type": "nextstep",
    "base_image_grid_size": 32,
}


def test_published_large_config_gets_qwen25_defaults():
    cfg = model_config_from_dict(dict(LARGE))
    assert cfg.family == FAMILY_V1
    assert cfg.head_dim == 128 and cfg.token_dim == 64 and cfg.down_factor == 16
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-5 and cfg.vocab_size == 152064
    assert cfg.attention_bias and not cfg.o_attention_bias
    assert not cfg.use_gen_pos_embed


def test_family_comes_from_the_config_not_the_name():
    v11 = dict(LARGE, o_attention_bias=False, pad_token_id_added=151665, rms_norm_eps=1e-5, vae_name_or_path="vae/")
    assert detect_family(v11) == FAMILY_V1_1
    assert detect_family(dict(LARGE, _name_or_path="NextStep-1.1")) == FAMILY_V1  # a folder name proves nothing
    assert detect_family(dict(LARGE, nextstep_family="nextstep-1.1")) == FAMILY_V1_1
    with pytest.raises(CheckpointError, match="nextstep_family"):
        detect_family(dict(LARGE, nextstep_family="nextstep-9"))


def test_o_attention_bias_null_means_same_as_attention_bias():
    assert model_config_from_dict(dict(LARGE, o_attention_bias=None)).o_attention_bias is True


def test_plain_qwen2_is_refused_with_advice():
    qwen = {k: v for k, v in LARGE.items() if k not in ("boi", "eoi", "image_placeholder_id", "fm_head_dim",
                                                        "fm_head_layers", "latent_patch_size")}
    qwen["model_type"] = "qwen2"
    with pytest.raises(CheckpointError, match="not a NextStep model config.*Qwen2"):
        model_config_from_dict(qwen, "x/config.json")


def test_vae_config_in_the_model_slot_and_back():
    vae = {"ch": 128, "ch_mult": [1, 2, 4, 4], "z_channels": 16, "scaling_factor": 1.0, "shift_factor": 0.0}
    with pytest.raises(CheckpointError, match="describes a VAE"):
        model_config_from_dict(vae)
    with pytest.raises(CheckpointError, match="describes the NextStep AR model"):
        vae_config_from_dict(LARGE)


def test_contradictory_fields_are_named():
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        model_config_from_dict(dict(LARGE, num_key_value_heads=7))
    with pytest.raises(CheckpointError, match="boi"):
        model_config_from_dict(dict(LARGE, boi=10**7))
    with pytest.raises(CheckpointError, match="rope_scaling"):
        model_config_from_dict(dict(LARGE, rope_scaling={"type": "yarn"}))


def test_vae_config_defaults_are_the_reference_dataclass_values():
    cfg = vae_config_from_dict({"z_channels": 16})
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.encoder_norm, cfg.psz) == (0.3611, 0.1159, False, None)
    cfg = vae_config_from_dict({"z_channels": 16, "scaling_factor": 1, "shift_factor": 0, "encoder_norm": True,
                                "psz": 2, "deterministic": True})
    assert cfg.psz == 2 and cfg.encoder_norm and cfg.downsample == 8
