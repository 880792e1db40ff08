"""Minimal safetensors reading without mmap, so that loading never keeps a whole shard resident.

safetensors' own `safe_open` maps the file; every page a read touches then counts towards the process's memory until
the file is closed, so loading a 5 GB shard into bf16 would briefly hold the shard as well. Reading each tensor with
plain reads into its own buffer keeps peak memory at the target model plus one source tensor. The header is read
here too, with Python's own file calls, so a fault of the file system (permission denied, a symbolic link loop, a
folder in place of the file) is reported as itself and never as a corrupt download.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from ..errors import CheckpointError
from ..fs import fs_error

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
             torch.int16: "I16", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}
FROM_ST = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 << 20  # safetensors' own limit; a larger length field means the file is not safetensors


def unsupported_dtype(path: str, key: str, dtype) -> CheckpointError:
    """The error for a tensor stored in a dtype this package cannot read or write."""
    known = ", ".join(sorted(FROM_ST))
    return CheckpointError(f"{path}: tensor {key} is stored as {dtype}, which NextStep cannot read (it reads "
                           f"{known}); convert it to bf16 or fp32 first.")


def _corrupt(path: str, detail: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or corrupt ({detail}); download it again.")


def read_header(path: str) -> tuple[dict, dict, int]:
    """(metadata, {key: entry with dtype, shape, data_offsets}, start of the data) of a safetensors file.

    Checks what the data needs (every tensor's bytes lie inside the file and match its dtype and shape) without
    reading any of it. OSError comes through as it is, for the caller to name the file's fault.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        size = os.fstat(f.fileno()).st_size
        if len(raw) < 8:
            raise _corrupt(path, "no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise _corrupt(path, f"its header length field says {n} bytes; is it a safetensors file?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise _corrupt(path, f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    for key, e in header.items():
        try:
            start, end = e["data_offsets"]
            count = 1
            for d in e["shape"]:
                count *= int(d)
            dtype = e["dtype"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"the header entry of {key} is malformed") from None
        need = count * FROM_ST[dtype].itemsize if dtype in FROM_ST else end - start
        if end - start != need:
            raise _corrupt(path, f"{key} holds {end - start} bytes but its shape needs {need}")
        if not 0 <= start <= end or 8 + n + end > size:
            raise _corrupt(path, f"{size} bytes, {key} needs {8 + n + end}")
    return metadata, header, 8 + n


class TensorReader:
    """Reads single tensors of a safetensors file with pread, so memory holds only the tensor asked for."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.metadata, self.entries, self.base = read_header(path)
        except OSError as e:
            raise fs_error("read", path, e, CheckpointError) from None

    def get(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        dtype = FROM_ST.get(e["dtype"])
        if dtype is None:
            raise unsupported_dtype(self.path, key, e["dtype"])
        start, end = e["data_offsets"]
        buf = bytearray(end - start)
        view, done = memoryview(buf), 0
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.base + start)
                while done < len(buf):  # a raw read may return less than asked for
                    n = f.readinto(view[done:])
                    if not n:
                        raise _corrupt(self.path, f"it ended early while reading {key}")
                    done += n
        except OSError as err:
            raise fs_error("read", self.path, err, CheckpointError) from None
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])
