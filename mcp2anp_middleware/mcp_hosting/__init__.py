"""Hosting the official SDK's MCP server with full sessions on every worker."""
