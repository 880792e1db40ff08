"""Projections merged at load (q/k/v, gate/up: one matmul each) while files and hosts keep seeing the published keys.

A merged layer holds its parts' tensors concatenated along the output rows, so every tensor a layer has in the file
layout (weight, bias, and a quantised layer's `weight_scale` / `weight_zero`) merges the same way. Quantised layers
merge before their kernel is chosen (`quant.prepare_quantized`), and the merged layer is then packed for the device
as one; int4's packed layouts keep rows together in tiles (`QuantLinear.row_block`), so parts merge only at tile
boundaries, where `state_dict()` can split the packed tensor back into the parts' own packed tensors.
"""
from __future__ import annotations

import torch
from torch import nn


class PublishedKeys:
    """Merges a module's layers `parts` into the layer `merged`, and keeps the published keys: `state_dict()` gives
    the parts (views of the merged tensors) and `load_state_dict()` takes them, so files and hosts see no change."""

    def __init__(self, module: nn.Module, merged: str, parts: tuple):
        self.module, self.merged, self.parts = module, merged, parts
        self.sizes: list[int] = []
        module._register_state_dict_hook(self._split)
        module._register_load_state_dict_pre_hook(self._join)

    def fuse(self) -> bool:
        m = self.module
        layers = [getattr(m, name) for name in self.parts]
        merged = merge_linears(layers)
        if merged is None:
            return False
        self.sizes = [layer.out_features for layer in layers]
        for name in self.parts:
            delattr(m, name)
        setattr(m, self.merged, merged)
        return True

    def _split(self, module, state, prefix, _meta):
        if getattr(module, self.merged) is None:
            return
        total = sum(self.sizes)
        for key in [k for k in state if k.startswith(f"{prefix}{self.merged}.")]:
            suffix = key.rsplit(".", 1)[1]
            t = state.pop(key)
            rows = [t.shape[0] * n // total for n in self.sizes]  # CUDA / MPS int4: one row per 8-row tile
            for name, piece in zip(self.parts, t.split(rows)):
                state[f"{prefix}{name}.{suffix}"] = piece

    def _join(self, state, prefix, *_args):
        layer = getattr(self.module, self.merged)
        if layer is None:
            return
        for suffix in _tensors(layer):
            keys = [f"{prefix}{name}.{suffix}" for name in self.parts]
            if all(k in state for k in keys):
                state[f"{prefix}{self.merged}.{suffix}"] = torch.cat([state.pop(k) for k in keys])


def merge_linears(parts: list) -> nn.Module | None:
    """One layer computing cat([p(x) for p in parts], -1), of the parts' own class; None where they cannot merge.

    Parts merge when they are of one class and hold the same kinds of tensors (same names, dtypes, device and
    trailing shapes), so that the merged layer multiplies as each part would. A quantised part must still be in the
    file layout (no kernel chosen yet) and its rows a whole number of its packed layout's tiles. The class is kept
    so a host's layer (ComfyUI's cast / weight-streaming Linear) still runs the merged one; the parts' tensors are
    released once it is built.
    """
    first = parts[0]
    cls, tensors = type(first), _tensors(first)
    for p in parts:
        mine = _tensors(p)
        if type(p) is not cls or mine.keys() != tensors.keys() or p.in_features != first.in_features \
                or p.out_features % getattr(p, "row_block", 1) or getattr(p, "kernel", "dense") != "dense" \
                or any(_kind(t) != _kind(tensors[k]) for k, t in mine.items()):
            return None
    if "weight_scale" not in tensors and (first.weight.element_size() < 2 or not first.weight.dtype.is_floating_point):
        return None  # low-precision codes without a scale: not a format this merge knows
    with torch.device("meta"):
        merged = cls(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None)
    for name in tensors:
        t = torch.cat([getattr(p, name) for p in parts])
        setattr(merged, name, nn.Parameter(t, requires_grad=False) if name in ("weight", "bias") else t)
    return merged


def _tensors(layer: nn.Module) -> dict:
    """{name: tensor} of what a layer keeps in a file: its parameters and persistent buffers that are set."""
    out = dict(layer.named_parameters(recurse=False))
    out.update((name, b) for name, b in layer.named_buffers(recurse=False)
               if name not in layer._non_persistent_buffers_set)
    return out


def _kind(t: torch.Tensor) -> tuple:
    """What must agree for tensors to be concatenated along the rows and still mean the same."""
    return t.dtype, t.device, tuple(t.shape[1:])
