"""The safetensors file format, read and written without the ``safetensors`` package when it is missing.

The artifact's weights are a safetensors file (tensors only: loading it cannot run code, unlike a
pickle). Training must also run where only torch, Lightning, numpy, pandas, pyarrow and PyYAML are
installed (the GPU machine), so when the package is absent the format is written and read here: an
8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte range,
padded with spaces to 8 bytes, then the raw little-endian bytes. ``tests/models/test_tensor_file.py`` checks
that each side reads what the other writes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
CODES = {v: k for k, v in DTYPES.items()}


def write(tensors: dict[str, torch.Tensor], path: Path | str) -> None:
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for data in chunks:
            fh.write(data)


def read(path: Path | str) -> dict[str, torch.Tensor]:
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    body = memoryview(blob)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(body):
            raise ValueError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
        dtype = CODES[info["dtype"]]
        data = bytearray(body[begin:end])
        flat = torch.frombuffer(data, dtype=torch.uint8).view(dtype) if data else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out


try:  # the package when installed (memory-mapped, audited); the same format either way
    from safetensors.torch import load_file, save_file
except ModuleNotFoundError:
    def save_file(tensors: dict[str, torch.Tensor], filename: str) -> None:
        write(tensors, filename)

    def load_file(filename: str) -> dict[str, torch.Tensor]:
        return read(filename)
