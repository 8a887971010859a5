"""Atomic writes: readers see the old file or the whole new one, nothing is left behind, writers see the real name."""

import json

import numpy as np
import pytest
import torch

from workbench.io import atomic_path, write_json_atomic, write_text_atomic
from workbench.palettes.importance import Importance


def test_atomic_path_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    with atomic_path(path) as tmp:
        assert tmp.name == "out.txt" and tmp.parent.parent == path.parent and not path.exists()
        tmp.write_text("new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = write_text_atomic(tmp_path / "out.json", "old\n")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_json_layout_and_torch_save_bytes_are_those_of_a_plain_write(tmp_path):
    data = {"a": [1, 2], "b": {"c": None}}
    assert write_json_atomic(tmp_path / "d.json", data).read_text() == json.dumps(data, indent=2) + "\n"
    state = {"step": 3, "w": torch.arange(6.0)}
    (tmp_path / "plain").mkdir()
    torch.save(state, tmp_path / "plain" / "stage1_vae.pt")
    with atomic_path(tmp_path / "stage1_vae.pt") as tmp:
        torch.save(state, tmp)  # torch names the archive after the file: the same name, the same bytes
    assert (tmp_path / "stage1_vae.pt").read_bytes() == (tmp_path / "plain" / "stage1_vae.pt").read_bytes()


def test_importance_files_round_trip_under_any_name(tmp_path):
    importance = Importance({"a.b": np.arange(6.0).reshape(1, 6), "c": np.ones((1, 3, 1, 1))})
    path = importance.save(tmp_path / "importance.bin")  # np.savez would add ".npz" to a path
    assert [p.name for p in tmp_path.iterdir()] == ["importance.bin"]
    loaded = Importance.load(path)
    assert set(loaded.arrays) == {"a.b", "c"} and np.array_equal(loaded.arrays["a.b"], importance.arrays["a.b"])
