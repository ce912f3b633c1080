"""The installed version of llm-nb, from package metadata.

Its own module so that the host and the server extension can name their version without
importing ``llm_nb/__init__`` helpers meant for kernels.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llm-nb")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
