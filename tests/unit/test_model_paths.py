"""What a model's ``path`` can be: a GGUF file, a directory holding one (a
Hugging Face cache snapshot, or the model's cache folder), or "embedded";
anything else fails the config check naming the key, the path and why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aiosd.config import ConfigError
from aiosd.llm.llamacpp import embedded_model_path, resolve_model

KEY = "llm.models[0].path"


def gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def test_a_file_a_directory_and_the_embedded_model(tmp_path: Path) -> None:
    model = gguf(tmp_path / "m" / "model.Q4.gguf")
    assert resolve_model(str(model), KEY) == model
    assert resolve_model(str(model.parent), KEY) == model
    assert resolve_model("embedded", KEY) == embedded_model_path()


def test_a_hugging_face_cache_folder_gives_its_newest_snapshot(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    old = gguf(repo / "snapshots" / "aaa" / "old.gguf")
    new = gguf(repo / "snapshots" / "bbb" / "new.gguf")
    os.utime(old.parent, (1, 1))
    assert resolve_model(str(repo), KEY) == new
    assert resolve_model(str(old.parent), KEY) == old   # a snapshot named directly


@pytest.mark.parametrize("make, why", [
    (lambda p: p / "missing.gguf", "No such file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no GGUF file in directory"),
    (lambda p: [gguf(p / "two" / n) for n in ("a.gguf", "b.gguf")] and p / "two",
     "holds 2 GGUF files (a.gguf, b.gguf); name one"),
    (lambda p: [(p / "x.gguf").write_text("not a model")] and p / "x.gguf", "is not a GGUF file"),
])
def test_what_cannot_be_a_model_is_refused_naming_the_key_path_and_reason(
        tmp_path: Path, make, why: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        resolve_model(str(path), KEY)
    message = str(info.value)
    assert message.startswith(KEY) and str(path) in message and why in message
