"""config.json -> typed configs: defaults, the family from the config alone, and clear errors for the wrong kind of
file. (Folders, file names and download records: test_family_detection.py.)"""
import pytest

from nextstep_core.weights.config import FAMILY_V1, FAMILY_V1_1, ModelConfig, model_config_from_dict, vae_config_from_dict
from nextstep_core.errors import CheckpointError, NextStepError

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


# what StepFun's NextStepConfig classes add when they save (reference notes §15): neither key tells the families apart
OFFICIAL = dict(LARGE, o_attention_bias=False, pad_token_id_added=151665, vae_name_or_path="vae/")


def family(raw, **kw):
    cfg = model_config_from_dict(raw, **kw)
    return cfg.family, cfg.family_reason, cfg.family_guessed


def test_keys_the_official_nextstep1_code_writes_are_no_evidence_of_1_1():
    fam, reason, guessed = family(dict(OFFICIAL))
    assert fam == FAMILY_V1 and guessed and reason.startswith("the default")
    assert family(dict(OFFICIAL, o_attention_bias=True, vae_name_or_path="./vae"))[0] == FAMILY_V1


def test_the_published_name_in_name_or_path_decides():
    assert family(dict(OFFICIAL, _name_or_path="stepfun-ai/NextStep-1.1")) == (
        FAMILY_V1_1, "from the config's _name_or_path 'stepfun-ai/NextStep-1.1'", False)
    for name in ("stepfun-ai/NextStep-1-Large", "/data/NextStep-1-Large-Edit/", "nextstep-1-large-pretrain"):
        fam, _, guessed = family(dict(OFFICIAL, _name_or_path=name))
        assert (fam, guessed) == (FAMILY_V1, False), name
    fam, _, guessed = family(dict(OFFICIAL, _name_or_path="Qwen/Qwen2.5-14B"))  # not a NextStep name: the default
    assert (fam, guessed) == (FAMILY_V1, True)


def test_only_1_1_era_training_keys_are_weak_evidence():
    fam, reason, guessed = family(dict(OFFICIAL, hw_aspect_ratios_ids=[[1, 1]], image_loss_weight=1.0))
    assert fam == FAMILY_V1_1 and guessed and "weak evidence" in reason and "hw_aspect_ratios_ids" in reason


def test_model_type_stepx_llama_is_what_only_the_1_1_inference_class_writes():
    """NextStep-1's NextStepConfig writes model_type "nextstep" (every commit of its code); NextStep-1.1's GitHub
    inference class writes "stepx_llama" (reference notes §14.7)."""
    fam, reason, guessed = family(dict(OFFICIAL, model_type="stepx_llama"))
    assert (fam, guessed) == (FAMILY_V1_1, False) and "model_type 'stepx_llama'" in reason
    assert family(dict(OFFICIAL, model_type="nextstep"))[:3:2] == (FAMILY_V1, True)  # no evidence: the default
    # a published name still outranks the config class
    assert family(dict(OFFICIAL, model_type="stepx_llama", _name_or_path="NextStep-1-Large"))[0] == FAMILY_V1


def test_our_key_beats_the_name_and_an_explicit_family_beats_everything():
    raw = dict(OFFICIAL, nextstep_family="nextstep-1.1", _name_or_path="stepfun-ai/NextStep-1-Large")
    assert family(raw) == (FAMILY_V1_1, "from nextstep_family in config.json", False)
    assert family(raw, family="nextstep-1") == (FAMILY_V1, "set explicitly", False)
    assert family(dict(OFFICIAL), family="auto")[0] == FAMILY_V1
    with pytest.raises(CheckpointError, match="nextstep_family"):
        family(dict(LARGE, nextstep_family="nextstep-9"))
    with pytest.raises(NextStepError, match="unknown family 'nextstep-2'.*auto, nextstep-1, nextstep-1.1"):
        family(dict(LARGE), family="nextstep-2")


def test_the_family_and_its_reason_survive_a_round_trip():
    cfg = model_config_from_dict(dict(OFFICIAL, _name_or_path="NextStep-1.1"))
    back = model_config_from_dict(cfg.to_json_dict())
    assert back.family == FAMILY_V1_1 and not back.family_guessed
    assert back.family_reason == "from nextstep_family in config.json; recorded there: from the config's " \
                                 "_name_or_path 'NextStep-1.1'"
    assert "family_guessed" not in cfg.to_json_dict() and "nextstep_family_reason" not in ModelConfig().to_json_dict()


def test_o_attention_bias_null_means_same_as_attention_bias():
    assert model_config_from_dict(dict(LARGE, o_attention_bias=None)).o_attention_bias is True


def test_plain_qwen2_is_refused_with_advice():
    qwen = {k: v for k, v in LARGE.items() if k not in ("boi", "eoi", "image_placeholder_id", "fm_head_dim",
                                                        "fm_head_layers", "latent_patch_size")}
    qwen["model_type"] = "qwen2"
    with pytest.raises(CheckpointError, match="not a NextStep model config.*Qwen2"):
        model_config_from_dict(qwen, "x/config.json")


def test_the_1_1_github_codes_model_type_is_a_nextstep_config():
    cfg = model_config_from_dict(dict(OFFICIAL, model_type="stepx_llama", attn_implementation="sdpa"))
    assert cfg.hidden_size == 5120 and "attn_implementation" not in cfg.extra


def test_vae_config_in_the_model_slot_and_back():
    vae = {"ch": 128, "ch_mult": [1, 2, 4, 4], "z_channels": 16, "scaling_factor": 1.0, "shift_factor": 0.0}
    with pytest.raises(CheckpointError, match=r"is a VAE \(the f8ch16 tokenizer\), not the model: load it as the VAE"):
        model_config_from_dict(vae)
    with pytest.raises(CheckpointError, match="is the NextStep AR model, not its VAE"):
        vae_config_from_dict(LARGE)
    with pytest.raises(CheckpointError, match="is not a NextStep VAE config"):
        vae_config_from_dict({"ch": 128})


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
