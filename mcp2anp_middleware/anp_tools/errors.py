"""Stable error codes the ANP tools report (as ``isError`` tool results, never as success)."""

from __future__ import annotations

from typing import Any

ERROR_HINTS: dict[str, str] = {
    "INVALID_ARGUMENT": "Fix the arguments and call the tool again.",
    "URL_REFUSED": "This server's URL policy does not allow that URL; use an http(s) URL of an "
    "allowed ANP agent.",
    "UNREACHABLE": "The agent could not be reached; check the URL or try again later.",
    "TIMEOUT": "The agent did not answer in time; try again later.",
    "RESPONSE_TOO_LARGE": "The document is larger than this server accepts.",
    "RESPONSE_TOO_DEEP": "The agent's JSON nests deeper than this server accepts (see 'limit').",
    "HTTP_ERROR": "The agent answered with an HTTP error; check the URL and your access.",
    "INVALID_RESPONSE": "The agent's answer is not valid JSON-RPC; check the endpoint URL.",
    "JSONRPC_ERROR": "The agent returned a JSON-RPC error; read its code and message.",
    "CREDENTIAL_ERROR": "This session's DID credential is unusable; ask the operator.",
    "INTERNAL_ERROR": "The server failed unexpectedly; try again, and report it if it persists.",
}


class ANPToolError(Exception):
    """A failure a tool reports to the agent with a stable ``code`` and extra ``details``."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_payload(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        hint = ERROR_HINTS.get(self.code)
        if hint:
            error["hint"] = hint
        error.update(self.details)
        return {"error": error}
