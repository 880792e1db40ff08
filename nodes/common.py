"""Names and helpers shared by the pack's nodes."""
from __future__ import annotations

import contextlib

import torch

from .. import nextstep_core as ns
from ..nextstep_core.generation.settings import MAX_SIDE, TOKEN_PIXELS  # the engine's limits: one image token is 16x16 px
from . import comfy_glue as glue

CATEGORY = "NextStep"
MODEL = "NEXTSTEP_MODEL"
VAE = "NEXTSTEP_VAE"
CONDITIONING = "NEXTSTEP_CONDITIONING"


class NextStepNodeError(RuntimeError):
    """A problem the user can fix, reported by ComfyUI as a one-line execution error on the node."""


@contextlib.contextmanager
def user_errors(node: str):
    """Turns the engine's user-facing errors into short node errors; the server stays up and says what to fix.

    `node` is the node's display name, its class's TITLE.

    Programming errors are left alone so that their traceback still reaches the log.
    """
    try:
        yield
    except ns.GenerationCancelled as e:
        glue.raise_if_cancelled(e)
    except (ns.NextStepError, FileNotFoundError, ConnectionError) as e:
        raise NextStepNodeError(f"{node}: {e}") from None


def check_size(name: str, value) -> str | None:
    if value is None:  # linked from another node: checked when it runs
        return None
    if not isinstance(value, int) or value < TOKEN_PIXELS or value > MAX_SIDE or value % TOKEN_PIXELS:
        return (f"{name} must be a multiple of {TOKEN_PIXELS} between {TOKEN_PIXELS} and {MAX_SIDE} "
                f"(one NextStep image token covers {TOKEN_PIXELS}x{TOKEN_PIXELS} pixels), got {value}")
    return None


def image_to_engine(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] 0..1 -> engine pixels [B,3,H,W] 0..1 (alpha dropped, grey expanded)."""
    if image.ndim != 4:
        raise NextStepNodeError(f"expected an IMAGE batch [B,H,W,C], got shape {list(image.shape)}")
    image = image[..., :3]
    if image.shape[-1] == 1:
        image = image.expand(*image.shape[:-1], 3)
    return image.permute(0, 3, 1, 2).contiguous().float()


def image_from_engine(pixels: torch.Tensor) -> torch.Tensor:
    """Engine pixels [B,3,H,W] 0..1 -> ComfyUI IMAGE [B,H,W,3] float32 on ComfyUI's intermediate device."""
    return pixels.permute(0, 2, 3, 1).float().clamp(0, 1).contiguous().to(glue.intermediate_device())
