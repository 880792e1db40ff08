"""AutoRound / GPTQ W4A16 folders: their packed linears read into our int4 file layout, or dequantised. Nothing runs.

What is read: `quantization_config` in config.json, as auto-round (0.16.1 checked) and AutoGPTQ / GPTQModel write it:
- `quant_method`: "auto-round" (older auto-round: "intel/auto-round") or "gptq";
- the packing: auto-round's `packing_format` "auto_round:auto_gptq" (its default, and what a symmetric W4A16 export
  writes) or "auto_round:gptqmodel"; GPTQ's `checkpoint_format` "gptq" (the default) or "gptq_v2";
- `bits` 4; `data_type` "int"; `act_bits` absent or 16 and up (weight-only); `group_size` (-1: one group per row);
- `extra_config` (auto-round's per-layer overrides) and `dynamic` (GPTQModel's): a layer may be 16-bit (stored dense)
  or 4-bit int, nothing else;
- `sym`, `desc_act`, `block_name_to_quantize` are shown by `info`. Which layers are packed is read from the tensors.

Per packed linear P (the published key names, no prefix): `P.qweight` int32 [in/8, out] (input row 8r + j in bits
4j..4j+3 of word r), `P.qzeros` int32 [groups, out/8] (output column 8c + j likewise), `P.scales` [groups, out]
(float16 as written), optional `P.g_idx` int32 [in] (must be i // group_size: act-order is refused) and `P.bias`.
The weight is w[o, i] = scale[g, o] * (q[i, o] - z[g, o]) with g = i // group_size. GPTQ-v1 packing
("auto_round:auto_gptq", "gptq") stores z - 1 in `qzeros` (auto-round's readers add the 1 back for exactly these
formats), the others store z.

Into our int4 layout (`quant_int4`, groups of 128): the codes are moved, not changed (a transpose and a split of each
int32 into bytes); scale = s and zero = s * (8 - z), a group of 128 k repeating its scale and zero k times. Codes and
zero points are exact. The scale/zero table is bfloat16 (what the kernels take) while the files' scales are float16,
so a weight is exact where s is a bfloat16 number and z = 8 (symmetric: zero 0), and otherwise off by at most
2^-8 * |s| * (|q - 8| + |8 - z|) <= |s| / 16 (|s| / 32 for symmetric groups, i.e. 1/32 of a quantisation step): the
rounding of s and of s * (8 - z) to bfloat16's 8 significant bits. Groups smaller than 128 cannot share a 128-group's
scale without changing numbers: such layers are refused at load and dequantised by `convert`.

Dequantised (`convert` to bf16 / fp16 / fp32 / fp8 / int8): s * (q - z) in float32, exact for float16 and bfloat16
scales, so fp16 equals auto-round's own dequantisation bit for bit and fp32 is the exact value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import quant_int4
from ..errors import CheckpointError

_AUTO_ROUND = ("auto-round", "intel/auto-round", "auto_round")
# packing -> what `qzeros` holds: z - 1 (1) or z (0)
_ZERO_OFFSET = {"auto_round:auto_gptq": 1, "auto_round:gptqmodel": 0, "gptq": 1, "gptq_v2": 0}
_ALIASES = {"auto_round:gptq": "auto_round:auto_gptq", "auto": "auto_round:auto_gptq"}  # as auto-round reads them
_PACKED = ("qweight", "qzeros", "scales", "g_idx")
_OURS = ("weight", "weight_scale", "weight_zero")


@dataclass(frozen=True)
class PackedFormat:
    """A folder's `quantization_config`, checked: everything `PackedReader` needs to unpack a layer."""
    method: str
    packing: str
    group_size: int
    sym: bool | None
    zero_offset: int  # 1: `qzeros` holds z - 1 (GPTQ v1); 0: z
    config: dict

    def describe(self) -> str:
        sym = {True: "symmetric", False: "asymmetric", None: "symmetry not stated"}[self.sym]
        group = "per row" if self.group_size == -1 else f"groups of {self.group_size}"
        return f"{self.method} ({self.packing}), 4-bit int, {group}, {sym}"


def packed_format(raw: dict, where: str) -> PackedFormat | None:
    """The checked format of a config with a `quantization_config`, None without one; errors name the field."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None

    def refuse(field: str, value, why: str) -> CheckpointError:
        return CheckpointError(f"{where}: quantization_config.{field} = {value!r}: {why}. This pack loads 4-bit "
                               "AutoRound / GPTQ weight-only checkpoints (W4A16); for this one, dequantise it with "
                               "its own tools and load the bf16/fp16 folder.")

    if not isinstance(qc, dict):
        raise refuse("", qc, "expected a table of settings")
    method = str(qc.get("quant_method", "")).lower()
    if method in _AUTO_ROUND:
        field, packing = "packing_format", qc.get("packing_format") or "auto_round:auto_gptq"
    elif method == "gptq":
        field, packing = "checkpoint_format", qc.get("checkpoint_format") or "gptq"
    else:
        raise refuse("quant_method", qc.get("quant_method"), "only auto-round and gptq checkpoints are read")
    packing = _ALIASES.get(packing, packing)
    if packing not in _ZERO_OFFSET:
        raise refuse(field, packing, f"not a GPTQ packing this pack reads (it reads {', '.join(_ZERO_OFFSET)})")
    if qc.get("bits") != 4:
        raise refuse("bits", qc.get("bits"), "only 4-bit weights are read")
    if qc.get("data_type", "int") != "int":
        raise refuse("data_type", qc.get("data_type"), "only integer weights are read")
    if (qc.get("act_bits") or 16) < 16:
        raise refuse("act_bits", qc.get("act_bits"), "quantised activations are not supported (weights only)")
    group = qc.get("group_size", 128)
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise refuse("group_size", group, "expected a positive group size or -1")
    for field, overrides in (("extra_config", qc.get("extra_config")), ("dynamic", qc.get("dynamic"))):
        for name, over in (overrides or {}).items():
            if field == "dynamic" and name.startswith("-:"):
                continue  # GPTQModel's "leave these layers dense"
            bits = over.get("bits", 4) if isinstance(over, dict) else None
            if bits is None or (bits < 16 and (bits != 4 or over.get("data_type", "int") != "int")):
                raise refuse(f"{field}[{name!r}]", over, "a layer may only be 4-bit int or kept in 16 bits")
    return PackedFormat(method, packing, group, qc.get("sym"), _ZERO_OFFSET[packing], qc)


@dataclass(frozen=True)
class PackedLayer:
    name: str  # module path, e.g. "layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    groups: int

    @property
    def group(self) -> int:
        return self.in_features // self.groups

    @property
    def maps(self) -> bool:
        """Whether the layer fits our int4 layout exactly (its groups whole multiples of 128)."""
        return self.group % quant_int4.GROUP == 0 and quant_int4.fits(self.out_features, self.in_features)


def packed_layers(shapes: dict, fmt: PackedFormat, where: str) -> dict[str, PackedLayer]:
    """{module path: PackedLayer} for every linear the files hold as qweight / qzeros / scales (shapes checked)."""
    layers = {}
    for key, shape in shapes.items():
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        missing = [f"{name}.{t}" for t in ("qzeros", "scales") if f"{name}.{t}" not in shapes]
        if missing:
            raise CheckpointError(f"{where}: {key} has no {missing[0]}; the checkpoint is incomplete: download it "
                                  "again.")
        in_f, out_f = 8 * shape[0], shape[1]
        groups = shapes[f"{name}.scales"][0]
        expected = {f"{name}.scales": (groups, out_f), f"{name}.qzeros": (groups, out_f // 8)}
        if f"{name}.g_idx" in shapes:
            expected[f"{name}.g_idx"] = (in_f,)
        for k, s in expected.items():
            if tuple(shapes[k]) != s or in_f % groups:
                raise CheckpointError(f"{where}: {k} has shape {list(shapes[k])}, which does not fit {key} "
                                      f"{list(shape)}; the files are not a 4-bit GPTQ packing.")
        stated = _stated_group(fmt, name)
        if stated is not None and ((stated == -1 and groups != 1) or (stated != -1 and stated * groups != in_f)):
            raise CheckpointError(f"{where}: {name} is stored in {groups} group(s) of {in_f // groups} inputs, but "
                                  f"quantization_config.group_size says {stated}; the config and the weights do not "
                                  "belong together.")
        layers[name] = PackedLayer(name, in_f, out_f, groups)
    return layers


def _stated_group(fmt: PackedFormat, name: str) -> int | None:
    """The group size the config gives `name`; None where GPTQModel's regex overrides (`dynamic`) may set another."""
    if any(not k.startswith("-:") for k in fmt.config.get("dynamic") or {}):
        return None
    over = (fmt.config.get("extra_config") or {}).get(name)
    return over.get("group_size", fmt.group_size) if isinstance(over, dict) else fmt.group_size


# ---- the arithmetic

def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [n/8, m] holding eight 4-bit values per word along the rows -> uint8 [n, m] (row 8r + j: bits 4j..)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((packed[:, None, :] >> shifts[None, :, None]) & 15).to(torch.uint8).reshape(-1, packed.shape[1])


def zero_points(qzeros: torch.Tensor, offset: int) -> torch.Tensor:
    """qzeros [groups, out/8] -> z int32 [out, groups] (the stored value plus the format's offset)."""
    return unpack_rows(qzeros.t().contiguous()).to(torch.int32) + offset


def int4_weight(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [in/8, out] -> our nibbles uint8 [out, in/2]: byte m of word r holds inputs 8r + 2m (low nibble) and
    8r + 2m + 1 (high), which is our byte 4r + m; so the codes only move."""
    w = qweight.t().contiguous()
    return torch.stack([(w >> s) & 255 for s in (0, 8, 16, 24)], dim=-1).to(torch.uint8).reshape(w.shape[0], -1)


def int4_table(scales: torch.Tensor, z: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) bfloat16 [out, in/128] of our layout from scales [groups, out] and z [out, groups]."""
    s = scales.t().float()
    repeat = in_features // s.shape[1] // quant_int4.GROUP
    zero = s * (8 - z).float()  # exact in float32; rounded once, to bfloat16
    return s.repeat_interleave(repeat, 1).to(torch.bfloat16), zero.repeat_interleave(repeat, 1).to(torch.bfloat16)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in] = s * (q - z), exact for float16 / bfloat16 scales."""
    q = unpack_rows(qweight).t()
    out_f, groups = z.shape
    w = q.reshape(out_f, groups, -1).float().sub_(z[..., None].float())
    return w.mul_(scales.t().float()[..., None]).reshape(out_f, -1)


# ---- the folder as our loader and converter read it

class PackedCheckpoint:
    """A folder's packed linears and how to read them; held by its Source as `packed`."""

    def __init__(self, origin, fmt: PackedFormat, layers: dict[str, PackedLayer]):
        self.origin, self.fmt, self.layers = origin, fmt, layers

    def view(self, keep_int4: bool = True, marker: bool = True):
        """`origin` as our int4 file layout (`keep_int4`: every layer that maps; the rest dequantised to float32), or
        with every packed layer dequantised. `marker` sets `nextstep_quant` so that the loader builds int4 layers."""
        src = self.origin
        key_files, shapes, dtypes = dict(src.key_files), dict(src.shapes), dict(src.dtypes)
        for name, layer in self.layers.items():
            files = {t: key_files.pop(f"{name}.{t}", None) for t in _PACKED}
            for t in _PACKED:
                shapes.pop(f"{name}.{t}", None)
                dtypes.pop(f"{name}.{t}", None)
            if keep_int4 and layer.maps:
                table = (layer.out_features, layer.in_features // quant_int4.GROUP)
                new = {"weight": ("U8", (layer.out_features, layer.in_features // 2), files["qweight"]),
                       "weight_scale": ("BF16", table, files["scales"]),
                       "weight_zero": ("BF16", table, files["scales"])}
            else:
                new = {"weight": ("F32", (layer.out_features, layer.in_features), files["qweight"])}
            for t, (dtype, shape, file) in new.items():
                key_files[f"{name}.{t}"], shapes[f"{name}.{t}"], dtypes[f"{name}.{t}"] = file, shape, dtype
        metadata = dict(src.metadata, nextstep_quant="int4") if marker else dict(src.metadata)
        reader = PackedReader(src, self, keep_int4)
        return dataclasses.replace(src, key_files=key_files, shapes=shapes, dtypes=dtypes, metadata=metadata,
                                   packed=self, reader=reader)

    def int4_keys(self) -> set[str]:
        """Keys of the int4 view that are the layers' own codes, scales and zeros (written unchanged by `convert`)."""
        return {f"{name}.{t}" for name, layer in self.layers.items() if layer.maps for t in _OURS}

    def check_loadable(self) -> None:
        """Refuse, naming the field, layers that cannot be repacked into int4 groups of 128 without changing them."""
        bad = [layer for layer in self.layers.values() if not layer.maps]
        if bad:
            b = bad[0]
            raise CheckpointError(
                f"{self.origin.path}: {len(bad)} packed layer(s) (e.g. {b.name}, [{b.out_features}, {b.in_features}] "
                f"in groups of {b.group}) do not fit int4 groups of {quant_int4.GROUP} "
                f"(quantization_config.group_size = {self.fmt.group_size}): regrouping would change the weights. "
                "Convert the folder instead, e.g. `python -m nextstep_core convert FOLDER out.safetensors --dtype "
                "int8` (dequantised exactly, then int8) or --dtype bf16.")

    def describe(self) -> list[str]:
        """`info` lines: the format and which layers are packed."""
        decoder = sum(n.startswith("layers.") for n in self.layers)
        head = sum(n.startswith("image_head.") for n in self.layers)
        groups = sorted({layer.group for layer in self.layers.values()})
        lines = [f"  quantised:   {self.fmt.describe()}",
                 f"  packed:      {len(self.layers)} linear layer(s): {decoder} in the decoder, {head} in the head, "
                 f"{len(self.layers) - decoder - head} elsewhere; groups of {', '.join(map(str, groups))} inputs"]
        bad = [layer.name for layer in self.layers.values() if not layer.maps]
        if bad:
            lines.append(f"               {len(bad)} of them (e.g. {bad[0]}) do not fit int4 groups of "
                         f"{quant_int4.GROUP}: convert the folder before loading it")
        if self.fmt.config.get("desc_act"):
            lines.append("               desc_act (act-order) is set: only group-ordered g_idx can be loaded")
        return lines


class PackedReader:
    """Reads a view's keys: our layout computed from a packed layer's tensors, anything else as it is stored."""

    def __init__(self, origin, checkpoint: PackedCheckpoint, keep_int4: bool):
        self.origin, self.checkpoint, self.keep_int4 = origin, checkpoint, keep_int4
        self.readers = {}

    def _raw(self, key: str) -> torch.Tensor:
        from .st_io import TensorReader

        path = self.origin.key_files[key]
        reader = self.readers.get(path) or self.readers.setdefault(path, TensorReader(path))
        return reader.get(key)

    def get(self, key: str) -> torch.Tensor:
        name, leaf = key.rsplit(".", 1)
        layer = self.checkpoint.layers.get(name)
        if layer is None or leaf not in _OURS:
            return self._raw(key)
        int4 = self.keep_int4 and layer.maps
        if leaf == "weight":
            self._check_order(layer)
            qweight = self._raw(f"{name}.qweight")
            if int4:
                return int4_weight(qweight)
            return dequantize(qweight, self._raw(f"{name}.scales"), self._zeros(name))
        scale, zero = int4_table(self._raw(f"{name}.scales"), self._zeros(name), layer.in_features)
        return scale if leaf == "weight_scale" else zero

    def _zeros(self, name: str) -> torch.Tensor:
        return zero_points(self._raw(f"{name}.qzeros"), self.checkpoint.fmt.zero_offset)

    def _check_order(self, layer: PackedLayer) -> None:
        key = f"{layer.name}.g_idx"
        if key not in self.origin.shapes:
            return
        if not torch.equal(self._raw(key).long(), torch.arange(layer.in_features) // layer.group):
            raise CheckpointError(f"{self.origin.key_files[key]}: {key} is not in group order (act-order, "
                                  "quantization_config.desc_act): its inputs are permuted, which this pack does not "
                                  "support. Re-quantise without desc_act, or dequantise it with its own tools.")
