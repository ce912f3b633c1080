"""llm-nb: one shared model host per Jupyter server.

Kernels never hold model weights: they ask the host to load a model, hold a
lease on it, and talk to it over HTTP. Importing this package stays light (no
torch, transformers or llama_cpp), so it is safe in every kernel.
"""

from ._version import __version__
from .errors import LlmNbError, StructuredOutputError

__all__ = ["LlmNbError", "StructuredOutputError", "__version__"]

# The Python API (llm_nb.load, chat, extract, unload, status, history, panel), imported on first use
# so that ``import llm_nb`` pulls in neither requests nor ipywidgets.
_API = ("load", "chat", "extract", "unload", "status", "history", "panel", "Session", "default_session")
_DEPLOY = ("deploy", "undeploy")  # llm_nb.deploy(name, folder), from llm_nb.deployment
_STRUCTURED = ("ToolCall", "json_schema_of", "tool_of", "validate_as")  # llm_nb.structured (pydantic)
__all__ += list(_API) + list(_DEPLOY) + list(_STRUCTURED)


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _STRUCTURED:
        from . import structured

        return getattr(structured, name)
    if name in _DEPLOY:
        from . import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module 'llm_nb' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    """``%load_ext llm_nb``: the magics (%llm_load, %%llm_chat, %llm_unload, %llm_status, ...)."""
    from .magics import load_ipython_extension as register

    register(ipython)


def _jupyter_labextension_paths() -> list[dict]:
    """Where the built JupyterLab panel lives (for ``jupyter labextension develop``)."""
    return [{"src": "labextension", "dest": "llm-nb"}]


def _jupyter_server_extension_points() -> list[dict]:
    """The Jupyter server extension; imported only when a server asks, so kernels stay light."""
    from .serverext import LlmNbExtension

    return [{"module": "llm_nb.serverext", "app": LlmNbExtension}]
