"""A launchable demo host for mcp2anp-middleware (``python -m example_app``)."""
