"""Jupyter server extension: one model host per server, and the REST API of the LLM panel.

Imported only by a Jupyter server (through ``llm_nb._jupyter_server_extension_points``),
never by a kernel.
"""

from .app import LlmNbExtension

__all__ = ["LlmNbExtension"]
