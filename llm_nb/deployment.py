"""Deploy a model folder to the shared host, and use host models from inside one.

In a notebook::

    import llm_nb
    d = llm_nb.deploy("summarise", "./summarise")   # model.py (+ model.json)
    d.api_url                                        # http://127.0.0.1:PORT/models/summarise/
    llm_nb.undeploy("summarise")                     # cleanup() runs, the worker ends

In ``model.py``, a model the host has loaded already (or loads now), shared
with every notebook instead of a second copy in memory::

    from llm_nb.deployment import use_model

    generator = None

    async def init(model_meta=None, *args, **kwargs):
        global generator
        generator = use_model("smollm2", max_new_tokens=200)

    async def predict(payload_dict: dict, **kwargs):
        res = generator([payload_dict["user_prompt"]])    # shaped like a transformers pipeline
        return {"answer": res[0][0]["generated_text"]}
        # or: return {"answer": await generator.achat(payload_dict["user_prompt"])}

``use_model`` reads the host's URL and the deployment's own credential from
the worker's environment (``LLM_NB_HOST_URL``, ``LLM_NB_DEPLOYMENT_TOKEN``);
the lease it takes is released at undeploy. Outside a deployment (trying
model.py out in a notebook) it uses this kernel's connection to the host.
This module imports no model library and nothing from ``llm_nb.host``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import DEFAULT_MODEL

HOST_URL_ENV = "LLM_NB_HOST_URL"
TOKEN_ENV = "LLM_NB_DEPLOYMENT_TOKEN"
DEPLOYMENT_ENV = "LLM_NB_DEPLOYMENT"
USE_MODEL_TIMEOUT_S = 900.0  # a lease may wait for the model's load


@dataclass
class Deployed:
    """What ``deploy`` answers: where the deployment serves, and what it is."""

    name: str
    version: int
    api_url: str
    state: str
    files: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def meta_url(self) -> str:
        return self.api_url + "?get_meta=true"

    def __str__(self) -> str:
        copied = sum(1 for f in self.files if not f.get("cached"))
        files = f", {len(self.files)} files ({copied} copied)" if self.files else ""
        return (
            f"{self.name} v{self.version} {self.state} at {self.api_url}{self._engine()} in {self.seconds:.1f} s{files}"
        )

    def _engine(self) -> str:
        if self.meta.get("engine") != "ray":
            return ""
        replicas = self.meta.get("replicas") or {}
        target = replicas.get("target")
        return f" on Ray ({replicas.get('running', 0)} of {target} replicas)" if target else " on Ray (autoscaling)"

    def _repr_markdown_(self) -> str:
        return (
            f"**{self.name}** v{self.version} · {self.state} · `{self.api_url}`{self._engine()} · {self.seconds:.1f} s"
        )


def _progress_printer(name: str) -> tuple[Callable[[dict], None], Callable[[], None]]:
    """A tqdm.auto bar: bytes while files copy, then the init stage."""
    from tqdm.auto import tqdm

    bar = None

    def on_progress(event: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=None, unit="B", unit_scale=True, desc=f"deploy {name}", leave=False)
        if event.get("stage") == "download" and event.get("total"):
            bar.total = event["total"]
            bar.n = event.get("bytes", 0)
            bar.set_postfix_str(event.get("file", ""), refresh=False)
            bar.refresh()
        elif event.get("message"):
            bar.set_description_str(f"deploy {name}: {event['message']}")

    def close() -> None:
        if bar is not None:
            bar.close()

    return on_progress, close


def deploy(
    name: str,
    folder: str | os.PathLike = ".",
    *,
    engine: str = "local",
    replicas: int | None = None,
    autoscaling: dict | None = None,
    ray_actor_options: dict | None = None,
    wait_for_resources: float | None = None,
    connection: str | os.PathLike | None = None,
    progress: bool = True,
) -> Deployed:
    """Deploy ``folder`` (with ``model.py``) as ``name``; a new version replaces a live one once its init() is done.

    ``engine="local"`` runs model.py in a worker of the host's; ``engine="ray"`` runs it as
    ``replicas`` replicas (or Ray Serve's ``autoscaling`` config) on the Ray cluster that
    ``RAY_ADDRESS`` names, or on a local head the host starts. ``ray_actor_options`` go to each
    replica (``{"num_cpus": 2}``, ``{"num_gpus": 1}``, ``{"runtime_env": ...}``). Replicas that
    can never fit on the cluster are refused at once (409); ones that cannot fit beside what runs
    now are waited for ``wait_for_resources`` seconds (default 120 on a cluster without an
    autoscaler; 0 refuses at once), with the reason in the progress, then refused the same way.
    """
    from .client import Client

    client = Client(connection)
    on_progress, close = _progress_printer(name) if progress else (None, lambda: None)
    engine_options = {
        "replicas": replicas,
        "autoscaling": autoscaling,
        "ray_actor_options": ray_actor_options,
        "wait_for_resources": wait_for_resources,
    }
    try:
        result = client.deploy(name, folder, on_progress=on_progress, engine=engine, **engine_options)
    finally:
        close()
    meta = result["deployment"]
    return Deployed(
        name=meta["name"],
        version=meta["version"],
        api_url=meta["api_url"],
        state=meta["state"],
        files=meta.get("files") or [],
        seconds=result.get("seconds", 0.0),
        meta=meta,
    )


def undeploy(name: str, *, connection: str | os.PathLike | None = None) -> dict:
    """Undeploy ``name``: its cleanup() runs, its worker ends, its model leases are released."""
    from .client import Client

    return Client(connection, autostart=False).undeploy(name)


def deployments(*, connection: str | os.PathLike | None = None) -> list[dict]:
    from .client import Client

    return Client(connection, autostart=False).deployments()


# --- inside model.py -----------------------------------------------------------------
_PIPELINE_PARAMS = {"max_new_tokens": "max_tokens", "max_length": "max_tokens"}


class HostModel:
    """A model on the host, for model.py: ``chat``, ``achat``, ``complete``, or call it like a pipeline.

    Its calls go through the kernel side's one client core (``Client.at``/``AsyncClient.at``): the same
    error mapping as everywhere, and replies read as streams, so a host that hangs is an error in seconds.
    """

    def __init__(self, url: str, credential: str, name: str, defaults: dict | None = None, release=None):
        from .client import Client

        self.url = url.rstrip("/")
        self.name = name
        self.defaults = dict(defaults or {})
        self._credential = credential
        self._client = Client.at(self.url, credential)
        self._release = release

    def __repr__(self) -> str:
        return f"HostModel({self.name!r} at {self.url})"

    def _params(self, params: dict) -> dict:
        merged = {**self.defaults, **params}
        out = {}
        for key, value in merged.items():
            if key == "do_sample":
                if value is False:
                    out.setdefault("temperature", 0.0)
                continue
            if key in ("return_full_text", "num_return_sequences"):
                continue  # pipeline options with one meaning here: the reply alone
            out[_PIPELINE_PARAMS.get(key, key)] = value
        return {k: v for k, v in out.items() if v is not None}

    def _messages(self, prompt: str | list[dict], system: str | None) -> list[dict]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def chat_completion(self, prompt: str | list[dict], *, system: str | None = None, **params: Any) -> dict:
        """The whole OpenAI-shaped answer, usage included."""
        return self._client.chat_completion(self._messages(prompt, system), self.name, **self._params(params))

    def chat(self, prompt: str | list[dict], *, system: str | None = None, **params: Any) -> str:
        return self._client.chat(self._messages(prompt, system), self.name, **self._params(params))

    async def achat_completion(self, prompt: str | list[dict], *, system: str | None = None, **params: Any) -> dict:
        """``chat_completion`` without blocking model.py's event loop: predictions overlap while they wait."""
        from .client import AsyncClient

        async with AsyncClient.at(self.url, self._credential) as client:
            return await client.chat_completion(self._messages(prompt, system), self.name, **self._params(params))

    async def achat(self, prompt: str | list[dict], *, system: str | None = None, **params: Any) -> str:
        from .client import AsyncClient

        async with AsyncClient.at(self.url, self._credential) as client:
            return await client.chat(self._messages(prompt, system), self.name, **self._params(params))

    def complete(self, prompt: str, **params: Any) -> str:
        return self._client.complete(prompt, self.name, **self._params(params))["choices"][0]["text"]

    def __call__(self, inputs: str | list, **params: Any) -> list:
        """Answer like a transformers text-generation pipeline: ``[{"generated_text": ...}]`` per input.

        A string gives one list of one dict; a list of strings, one such list
        each; a chat (a list of message dicts) gets the conversation back with
        the reply appended, as the chat pipeline does.
        """
        if isinstance(inputs, str):
            return [{"generated_text": self.chat(inputs, **params)}]
        if inputs and all(isinstance(m, dict) for m in inputs):
            reply = self.chat(inputs, **params)
            return [{"generated_text": [*inputs, {"role": "assistant", "content": reply}]}]
        return [[{"generated_text": self.chat(text, **params)}] for text in inputs]

    def release(self) -> None:
        """Give the lease back now (undeploy does it anyway)."""
        if self._release is not None:
            self._release()


def use_model(
    model: str = DEFAULT_MODEL,
    *,
    name: str | None = None,
    options: dict | None = None,
    keep_alive: float | str | None = None,
    **defaults: Any,
) -> HostModel:
    """A lease on ``model`` on the host (loaded now if it is not yet), and a small client for it.

    ``defaults`` are generation parameters used on every call (``max_tokens``,
    ``temperature``, or pipeline names like ``max_new_tokens``).
    """
    url, token, deployment = (os.environ.get(k) for k in (HOST_URL_ENV, TOKEN_ENV, DEPLOYMENT_ENV))
    body = {"model": model, "name": name, "options": options, "keep_alive": keep_alive}
    body = {k: v for k, v in body.items() if v is not None}
    if url and token and deployment:
        from .client import Client

        host = Client.at(url, token, timeout=USE_MODEL_TIMEOUT_S)
        served = host.call("POST", f"/api/deployments/{deployment}/use", body)["model"]["name"]
        return HostModel(url, token, served, defaults)
    # Not in a deployment: a notebook trying model.py out. Lease through this kernel's client.
    from .client import Client

    client = Client()
    result = client.load(model, name=name, options=options, keep_alive=keep_alive)
    served = result["model"]["name"]
    info = client.host_info()
    return HostModel(info["url"], info["key"], served, defaults, release=lambda: client.unload(served))
