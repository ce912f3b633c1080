"""A deployment's user code (``model.py``) in a worker process of its own.

The folder's ``model.py`` defines, the way Practicus AI model hosting does::

    async def init(model_meta=None, *args, **kwargs): ...   # once, at deploy
    async def predict(payload_dict: dict, **kwargs): ...    # per request
    async def cleanup(model_meta=None, *args, **kwargs): ... # at undeploy

Each may also be a plain function. The user's code runs on an event loop of
its own, in a thread of its own, so a slow or blocking ``predict`` never stalls
the worker's socket (``/info`` keeps answering), and everything ``init`` made
(clients, sessions) belongs to the same loop that ``predict`` runs on. A crash
of any kind (an exception, ``sys.exit``, ``os._exit``, a segfault) stays in
this process: the host answers with an error and lives on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.util
import inspect
import json
import logging
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..catalog import ModelSpec
from ..errors import InvalidRequest, LlmNbError
from .base import Backend, Progress

log = logging.getLogger("llm_nb.deployment")
CLEANUP_TIMEOUT_S = 30.0
#: How many predictions run at once unless model.json says ``max_concurrency``.
ASYNC_PARALLEL = 8


@dataclass
class ModelMeta:
    """What ``init``, ``predict`` and ``cleanup`` get as ``model_meta``."""

    name: str
    version: int
    folder: str  # where model.py is
    files_dir: str | None  # where model.json's download_files_from was copied to
    model_json: dict = field(default_factory=dict)
    host_url: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class DeploymentBackend(Backend):
    name = "deployment"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.options = dict(spec.options)
        self.folder = Path(spec.path or ".")
        self.module = None
        self.meta: ModelMeta | None = None
        self._predict_call = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- the user's own event loop ---------------------------------------------
    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        threading.Thread(target=run, name="model.py", daemon=True).start()
        ready.wait()
        self._loop = loop

    def _submit(self, fn, *args, **kwargs):
        """Run user code on its loop: coroutines there, plain functions in the loop's thread pool."""

        async def call():
            if inspect.iscoroutinefunction(fn):
                return await fn(*args, **kwargs)
            result = await self._loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(call(), self._loop)

    # --- load: import model.py, run init() -----------------------------------------
    def load(self, progress: Progress) -> None:
        model_py = self.folder / "model.py"
        if not model_py.is_file():
            raise InvalidRequest(f"{self.folder} has no model.py; a deployment folder needs one with predict()")
        # What use_model() in model.py reads: the host's URL and this deployment's own credential.
        for key, env in (("host_url", "LLM_NB_HOST_URL"), ("token", "LLM_NB_DEPLOYMENT_TOKEN")):
            if self.options.get(key):
                os.environ[env] = str(self.options[key])
        os.environ["LLM_NB_DEPLOYMENT"] = self.spec.name
        self.meta = ModelMeta(
            name=self.spec.name,
            version=int(self.options.get("version", 1)),
            folder=str(self.folder),
            files_dir=self.options.get("files_dir"),
            model_json=dict(self.options.get("model_json") or {}),
            host_url=self.options.get("host_url"),
        )
        progress("importing model.py", 0.05)
        self._start_loop()
        self.module = self._import(model_py)
        predict = getattr(self.module, "predict", None)
        if not callable(predict):
            raise InvalidRequest(f"{model_py} defines no predict(payload_dict, **kwargs); add one")
        self._predict_call = _adapter(predict, self.meta)
        self.parallel = max_concurrency(self.meta.model_json, inspect.iscoroutinefunction(predict))
        init = getattr(self.module, "init", None)
        if callable(init):
            progress("running init()", 0.1)
            try:
                self._submit(init, model_meta=self.meta).result()
            except Exception as exc:
                raise _user_error("init", exc, code="load_failed") from exc
        progress("ready", 1.0)

    def _import(self, model_py: Path):
        # Sibling modules of model.py import as they would next to it.
        if str(self.folder) not in sys.path:
            sys.path.insert(0, str(self.folder))
        spec = importlib.util.spec_from_file_location("model", model_py)
        module = importlib.util.module_from_spec(spec)
        sys.modules["model"] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise _user_error("import of model.py", exc, code="load_failed") from exc
        return module

    # --- requests ------------------------------------------------------------------
    async def predict(self, payload: Any, **kwargs: Any) -> Any:
        """One request: runs the user's predict on its loop; the result made JSON-safe."""
        if self._predict_call is None:
            raise LlmNbError("the deployment is not initialised yet", code="model_loading", status=503)
        future = self._submit(self._predict_call, payload, **kwargs)
        try:
            result = await asyncio.wrap_future(future)
        except LlmNbError:
            raise
        except Exception as exc:
            raise _user_error("predict", exc, code="predict_failed") from exc
        return jsonable(result)

    def info(self) -> dict[str, Any]:
        return {"device": "cpu", "deployment": self.meta.to_json() if self.meta else None}

    def close(self) -> None:
        """Undeploy: the user's cleanup(), then the loop ends."""
        cleanup = getattr(self.module, "cleanup", None) if self.module else None
        if callable(cleanup) and self._loop is not None:
            try:
                self._submit(cleanup, model_meta=self.meta).result(CLEANUP_TIMEOUT_S)
                log.info("cleanup() done")
            except Exception:
                log.exception("cleanup() of model.py failed")
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


def max_concurrency(model_json: dict, async_predict: bool) -> int:
    """Predictions one copy of model.py runs at once: model.json's ``max_concurrency``, else by predict's kind."""
    configured = model_json.get("max_concurrency")
    if configured is not None:
        if not isinstance(configured, int) or isinstance(configured, bool) or configured < 1:
            raise InvalidRequest(f"model.json max_concurrency must be a whole number >= 1, not {configured!r}")
        return configured
    # Coroutines share the loop and overlap while they wait; plain functions
    # (a torch pipeline, say) are rarely safe to run twice at once.
    return ASYNC_PARALLEL if async_predict else 1


def predict_is_async(model_py: Path) -> bool:
    """Whether model.py defines ``async def predict``, read from its source: the caller never runs user code."""
    import ast

    try:
        tree = ast.parse(model_py.read_text(encoding="utf-8"), filename=str(model_py))
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidRequest(f"{model_py} cannot be read as Python: {exc}") from None
    return any(isinstance(node, ast.AsyncFunctionDef) and node.name == "predict" for node in tree.body)


def _adapter(predict, meta: ModelMeta):
    """Call ``predict`` the way its signature asks.

    Practicus has had two shapes: ``predict(payload_dict, **kwargs)`` and the
    older ``predict(http_request, model_meta=None, payload_dict=None, ...)``.
    Either gets what it names; ``**kwargs`` also gets ``model_meta``.
    """
    params = inspect.signature(predict).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def call(payload: Any, **extra: Any):
        kwargs = {k: v for k, v in extra.items() if var_kw or k in named}
        if "model_meta" in named or var_kw:
            kwargs.setdefault("model_meta", meta)
        if "http_request" in named:
            kwargs["http_request"] = None  # the payload is already parsed: there is no request object
        if "payload_dict" in named:
            return predict(payload_dict=payload, **kwargs)
        return predict(payload, **kwargs)

    if inspect.iscoroutinefunction(predict):

        async def acall(payload: Any, **extra: Any):
            return await call(payload, **extra)

        return acall
    return call


def _user_error(stage: str, exc: BaseException, code: str) -> LlmNbError:
    """The user's exception, with the line of model.py that raised it, as an error the host passes on."""
    if isinstance(exc, LlmNbError):
        return exc
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "llm_nb" not in Path(f.filename).parts]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}()" if frames else ""
    log.error("%s failed", stage, exc_info=exc)
    return LlmNbError(
        f"model.py {stage} raised {type(exc).__name__}: {exc}{where}; the worker log has the traceback",
        code=code,
    )


def _default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if hasattr(value, "model_dump"):  # pydantic
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "to_dict"):  # pandas
        try:
            return value.to_dict(orient="records")
        except TypeError:
            return value.to_dict()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, or an error that says what predict() returned."""
    try:
        return json.loads(json.dumps(value, default=_default))
    except (TypeError, ValueError) as exc:
        raise LlmNbError(
            f"predict() returned something that is not JSON ({exc}); return a dict, list, str or number",
            code="predict_failed",
        ) from None
