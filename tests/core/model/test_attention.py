"""Attention's masks and the SDPA kernels a device may run: real masks, checked kernels, a bad one skipped."""
import logging

import pytest
import torch

from nextstep_core.model import attention as A


def test_a_decode_mask_is_materialised_one_row_per_query_and_hides_pads_and_unwritten_slots():
    start = torch.tensor([0, 3])
    mask = A.decode_mask(start, torch.tensor([5]), 8, torch.float32, group=4)
    assert mask.shape == (2, 1, 4, 8) and mask.is_contiguous() and 0 not in mask.stride()
    seen = mask[:, 0, 0] == 0
    assert seen.tolist() == [[True] * 6 + [False] * 2, [False] * 3 + [True] * 3 + [False] * 2]
    assert torch.equal(mask[:, :, 0], mask[:, :, 3])  # every query row of a K/V group sees the same slots


def test_a_prefill_mask_is_causal_and_pads_attend_only_to_themselves():
    real = torch.tensor([[False, False, True, True]])
    seen = A.prefill_mask(real, torch.bfloat16)[0, 0] == 0
    assert seen.tolist() == [[True, False, False, False], [False, True, False, False],
                             [False, False, True, False], [False, False, True, True]]


def test_the_kernels_found_here_agree_with_the_formula_and_math_is_among_them():
    A.sdpa_backends.cache_clear()
    names = A.backend_names("cpu", torch.float32, 16)
    assert "math" in names


def test_a_kernel_that_raises_or_disagrees_is_logged_and_never_used(monkeypatch, caplog):
    SDPBackend = A._backend_api()[0]
    real = A._run

    def run(backend, q, k, v, mask):
        if backend == SDPBackend.CUDNN_ATTENTION:
            raise RuntimeError("cuDNN Frontend error: no valid execution plans")
        out = real(backend, q, k, v, mask)
        return out + 1.0 if backend == SDPBackend.FLASH_ATTENTION else out

    monkeypatch.setattr(A, "_run", run)
    A.sdpa_backends.cache_clear()
    with caplog.at_level(logging.INFO, logger="nextstep"):
        found = A.sdpa_backends("cpu", torch.float32, 32)
    A.sdpa_backends.cache_clear()
    assert SDPBackend.FLASH_ATTENTION not in found and SDPBackend.CUDNN_ATTENTION not in found
    assert SDPBackend.MATH in found
    assert "no valid execution plans" in caplog.text and "FLASH_ATTENTION on cpu in torch.float32 gives wrong numbers" in caplog.text


def test_the_model_runs_under_the_working_kernels_only(tiny_model, monkeypatch):
    """Every forward enters the backend context once (not once per layer), with what the probe found."""
    entered = []
    real = A.use_backends
    monkeypatch.setattr("nextstep_core.model.decoder.use_backends",
                        lambda *a: entered.append(A.sdpa_backends(str(a[0]), a[1], a[2])) or real(*a))
    import nextstep_core as ns

    ns.sample(tiny_model, ns.Conditioning(["a"]), ns.SamplerSettings(width=32, height=16, steps=1))
    assert len(entered) == 2 and all(A._backend_api()[0].MATH in e for e in entered)  # prefill, one feed-back


@pytest.mark.parametrize("group", [1, 4])
def test_grouped_decode_attention_equals_the_formula(group):
    torch.manual_seed(0)
    q = torch.randn(2, 2 * group, 1, 16)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = A.decode_mask(torch.tensor([0, 2]), torch.tensor([7]), 9, torch.float32, group)
    got = A.attention(q, k, v, mask)
    ref = A._reference(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), mask[:, :, :1])
    assert torch.allclose(got, ref, atol=1e-5)
