"""The flow-matching head: the hoisted AdaLN form equals the plain per-step form."""
import torch

from nextstep_core.head import timestep_sinusoid


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
