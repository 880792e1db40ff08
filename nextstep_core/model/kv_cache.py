"""One attention layer's keys and values, written by slot: `k, v = cache.update(pos, k_new, v_new)`.

Each decoder layer owns one (`NextStep.setup_caches`). The tensors never move or grow once made, so a CUDA graph that
captured them keeps reading the right memory; what attention may see of them is decided by the mask and the
visible length the caller passes to `NextStep.forward`, never by state kept here.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, Hkv, S, D] go to slots `pos` [S] (a device tensor); returns the whole cache's k, v."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v

    @staticmethod
    def bytes_per_token(cfg, dtype: torch.dtype) -> int:
        """Bytes one token of one guidance row takes in all layers' caches."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
