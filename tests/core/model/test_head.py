"""The flow-matching head: the hoisted and fused AdaLN forms equal the plain per-step form."""
import torch

from nextstep_core.model.head import timestep_sinusoid


def test_timestep_embedding_is_cos_then_sin_of_unscaled_t():
    e = timestep_sinusoid(torch.tensor([0.0, 0.5]))
    assert e.shape == (2, 256)
    assert torch.allclose(e[0, :128], torch.ones(128)) and torch.allclose(e[0, 128:], torch.zeros(128))
    assert torch.isclose(e[1, 0], torch.cos(torch.tensor(0.5))) and torch.isclose(e[1, 128], torch.sin(torch.tensor(0.5)))


def test_hoisted_modulations_equal_the_plain_loop(tiny_model):
    head = tiny_model.image_head
    torch.manual_seed(0)
    c = torch.randn(6, tiny_model.config.hidden_size)
    x = torch.randn(6, 64)
    grid = torch.linspace(0, 0.9, 7)
    mods = head.modulations(grid, c)
    reused = head.modulations(grid, c, head.time_embeddings(grid, c.dtype))  # time embeddings kept from before
    assert all(torch.equal(a, b) for a, b in zip(mods, reused))
    for i, t in enumerate(grid):
        assert torch.allclose(head.velocity_premod(x, mods, i), head.velocity(x, t, c), atol=1e-5)


def test_the_head_depends_on_condition_time_and_input(tiny_model):
    head = tiny_model.image_head
    torch.manual_seed(1)
    c, x = torch.randn(2, tiny_model.config.hidden_size), torch.randn(2, 64)
    v = head.velocity(x, 0.3, c)
    assert not torch.allclose(v, head.velocity(x, 0.6, c))
    assert not torch.allclose(v, head.velocity(x + 0.1, 0.3, c))
    assert not torch.allclose(v, head.velocity(x, 0.3, c.flip(0)))


def test_fused_step_equals_the_plain_step_for_every_guidance_row(tiny_model):
    """velocity_fused: rows share x, so the input projection runs once and broadcasts; mods hold 1 + scale."""
    head = tiny_model.image_head
    torch.manual_seed(3)
    rows, images = 3, 2
    c = torch.randn(rows * images, tiny_model.config.hidden_size)
    x = torch.randn(images, 64)
    grid = torch.linspace(0, 0.9, 5)
    mods = head.modulations(grid, c, plus_one=True)
    for i, t in enumerate(grid):
        fused = head.velocity_fused(x, mods, i, rows)
        assert fused.shape == (rows, images, 64)
        plain = head.velocity(x.repeat(rows, 1), t, c).view(rows, images, 64)
        assert torch.allclose(fused, plain, atol=1e-5)


def test_plus_one_modulations_round_as_the_plain_form(tiny_model):
    head = tiny_model.image_head.to(torch.bfloat16)
    try:
        c = torch.randn(2, tiny_model.config.hidden_size).to(torch.bfloat16)
        grid = torch.linspace(0, 0.9, 3)
        plain, plus = head.modulations(grid, c), head.modulations(grid, c, plus_one=True)
        dim = tiny_model.config.fm_head_dim
        for a, b in zip(plain, plus):
            assert torch.equal(1 + a[..., dim:2 * dim], b[..., dim:2 * dim])  # the same bf16 rounding of 1 + scale
            assert torch.equal(a[..., :dim], b[..., :dim])
    finally:
        head.float()
