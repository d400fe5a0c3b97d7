"""Errors a user (or a model) can act on.

``ToolError`` carries a message that says what was wrong and what to pass instead. The MCP layer
(``cytoagent.mcpkit``) turns it into an MCP error result with exactly that text; any other
exception is logged with its traceback to stderr and summarised to the client.
"""

from __future__ import annotations


class ToolError(Exception):
    """An error caused by the caller's input, with a message that tells how to fix it."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} {hint}".strip() if hint else message)


class Cancelled(Exception):
    """Raised inside long-running library code when the caller cancelled the request."""


def require(condition: bool, message: str, hint: str | None = None) -> None:
    """Raise ``ToolError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ToolError(message, hint=hint)
