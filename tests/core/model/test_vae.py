"""The f8ch16 tokenizer: shapes, per-token normalisation, latent affine, and both weight formats."""
import os

import pytest
import torch

from nextstep_core import load_vae
from nextstep_core.errors import CheckpointError
from nextstep_core.model.vae import group_layer_norm


def test_encode_decode_shapes(tiny_vae):
    x = torch.rand(2, 3, 48, 64)
    z = tiny_vae.encode_mean(x)
    assert z.shape == (2, 16, 6, 8)
    y = tiny_vae.decode(z)
    assert y.shape == (2, 3, 48, 64) and y.min() >= 0 and y.max() <= 1


def test_encoder_latents_are_normalised_per_token(tiny_vae):
    """With encoder_norm and psz 2, each 2x2x16 group (one AR token) has zero mean and unit variance."""
    z = tiny_vae.encode_mean(torch.rand(1, 3, 32, 32))
    groups = z.reshape(1, 16, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(4, 64)
    assert torch.allclose(groups.mean(-1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(groups.var(-1, unbiased=False), torch.ones(4), atol=1e-3)


def test_group_layer_norm_psz1_is_per_pixel_over_channels():
    z = torch.randn(1, 16, 3, 5) * 3 + 1
    n = group_layer_norm(z, 1)
    assert torch.allclose(n.mean(1), torch.zeros(1, 3, 5), atol=1e-5)


def test_latent_affine_round_trip(tiny_vae):
    z = torch.randn(1, 16, 2, 2)
    assert torch.allclose(tiny_vae.from_ar(tiny_vae.to_ar(z)), z)


def test_checkpoint_pt_and_safetensors_load_the_same(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    a = load_vae(tiny_dir + "/vae")
    d = tmp_path / "vae_st"
    d.mkdir()
    (d / "config.json").write_text(open(tiny_dir + "/vae/config.json").read())
    save_file({k: v.contiguous() for k, v in torch.load(tiny_dir + "/vae/checkpoint.pt", weights_only=True).items()},
              str(d / "diffusion_pytorch_model.safetensors"))
    b = load_vae(str(d))
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k


def test_wrong_channel_count_is_named(tiny_dir, tmp_path):
    import json

    d = tmp_path / "vae_bad"
    d.mkdir()
    cfg = json.load(open(tiny_dir + "/vae/config.json"))
    cfg["z_channels"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    os.symlink(tiny_dir + "/vae/checkpoint.pt", d / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="16 latent channels.*z_channels = 4"):
        load_vae(str(d))


def test_model_folder_in_the_vae_slot(tiny_dir):
    with pytest.raises(CheckpointError, match="NextStep AR model, not its VAE"):
        load_vae(tiny_dir)
