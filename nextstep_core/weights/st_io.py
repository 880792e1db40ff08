"""Minimal safetensors reading without mmap, so that loading never keeps a whole shard resident.

safetensors' own `safe_open` maps the file; every page a read touches then counts towards the process's memory until
the file is closed, so loading a 5 GB shard into bf16 would briefly hold the shard as well. Reading each tensor with
plain reads into its own buffer keeps peak memory at the target model plus one source tensor.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from ..errors import CheckpointError

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
             torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float64: "F64"}
FROM_ST = {v: k for k, v in ST_DTYPES.items()}


class TensorReader:
    """Reads single tensors of a safetensors file with pread, so memory holds only the tensor asked for."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header); download it again.")
            (n,) = struct.unpack("<Q", raw)
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self.base = 8 + n
        size = os.path.getsize(path)
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.base + end > size:
            raise CheckpointError(f"{path} is truncated ({size} bytes, the header needs {self.base + end}); "
                                  "download it again.")

    def get(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        start, end = e["data_offsets"]
        buf = bytearray(end - start)
        view, done = memoryview(buf), 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.base + start)
            while done < len(buf):  # a raw read may return less than asked for
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{self.path} ended early while reading {key}; download it again.")
                done += n
        dtype = FROM_ST[e["dtype"]]
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])


