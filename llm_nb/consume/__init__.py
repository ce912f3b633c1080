"""Consume a model from a notebook: session tokens, metadata, predictions, and parallel prompts with timing.

Works against this host (deployments at ``/models/<name>/`` and ``/v1``),
any OpenAI-compatible server (vLLM, ``llama_cpp.server``, KServe's
``/openai/v1``), Practicus-style ``user_prompt`` endpoints, and KServe Open
Inference Protocol v2 (``/v2/models/<name>/infer``)::

    from llm_nb import consume
    token = consume.get_session_token(api_url)          # this host: from its connection file
    consume.get_meta(api_url, token)
    consume.predict(api_url, {"user_prompt": "Hi"}, token)
    report = consume.fire(api_url, prompts, concurrency=8)
    report                                               # a table and a latency plot in a notebook
    report.to_pandas()

Kernel side: imports nothing from ``llm_nb.host`` and no model library.
"""

from __future__ import annotations

from .endpoints import PROTOCOLS, detect_protocol, get_meta, get_session_token, predict
from .parallel import afire, fire
from .report import Report, RequestResult

__all__ = [
    "PROTOCOLS",
    "Report",
    "RequestResult",
    "afire",
    "detect_protocol",
    "fire",
    "get_meta",
    "get_session_token",
    "predict",
]
