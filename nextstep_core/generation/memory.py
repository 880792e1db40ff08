"""How much memory a generation needs, and refusing up front what cannot fit."""
from __future__ import annotations

import torch

from ..errors import NextStepError
from .prompt import grid_size


def estimate_memory_bytes(model, width: int, height: int, rows: int, prompt_tokens: int = 128) -> int:
    """Weights + KV cache + working memory of the prefill for `rows` guidance rows."""
    from ..model.kv_cache import KVCache

    cfg = model.config
    h, w = grid_size(width, height, cfg)
    seq = prompt_tokens + h * w
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = torch.empty((), dtype=model.dtype).element_size()
    kv = KVCache.bytes_per_token(cfg, model.dtype) * rows * seq
    act = rows * prompt_tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * elem
    return int(weights + kv + act)


def check_fits(model, rows: int, seq: int) -> None:
    """Refuse, before any compute, a cache that cannot fit in the device's free memory."""
    from ..model.kv_cache import KVCache

    need = KVCache.bytes_per_token(model.config, model.dtype) * rows * seq
    dev = model.device
    free = None
    if dev.type == "cuda":
        # memory PyTorch has reserved but not handed out is free for the cache too
        free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    elif dev.type == "cpu":
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:
            free = None
    if free is not None and need > 0.9 * free:
        raise NextStepError(f"this batch needs {need / 2**30:.1f} GiB for its KV cache ({rows} rows × {seq} tokens) but "
                            f"only {free / 2**30:.1f} GiB is free on {dev}: use fewer images or a smaller size.")
