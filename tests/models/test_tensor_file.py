"""The artifact's weights file without the safetensors package: the same format, each side reads the other."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.scoring import tensor_file

TENSORS = {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(5, dtype=torch.float64),
           "c": torch.arange(7, dtype=torch.int64), "d": torch.randn(2, 2).to(torch.bfloat16),
           "e": torch.tensor([True, False]), "f": torch.empty(0, 3), "g": torch.tensor(2.5)}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_the_package_reads_what_is_written_here(tmp_path):
    tensor_file.write(TENSORS, tmp_path / "w.safetensors")
    _same(load_file(str(tmp_path / "w.safetensors")), TENSORS)


def test_what_the_package_writes_is_read_here(tmp_path):
    save_file(TENSORS, str(tmp_path / "w.safetensors"))
    _same(tensor_file.read(tmp_path / "w.safetensors"), TENSORS)


def test_a_truncated_file_is_an_error(tmp_path):
    tensor_file.write(TENSORS, tmp_path / "w.safetensors")
    blob = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError):
        tensor_file.read(tmp_path / "cut.safetensors")
