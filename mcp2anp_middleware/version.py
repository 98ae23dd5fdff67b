"""The installed package's version (``mcp2anp_middleware.__version__``, the MCP ``serverInfo``)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mcp2anp-middleware")
except PackageNotFoundError:  # pragma: no cover - a checkout on sys.path without an install
    __version__ = "0+unknown"
