"""Provider-neutral conversation types, the provider interface, retries and token/cost accounting.

The agent loop keeps the conversation as a list of neutral :class:`Message` objects; each provider
converts that list to its own API format on every call (stateless), so the same loop drives
Anthropic, OpenAI(-compatible) and the scripted provider.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


@dataclass
class ToolSpec:
    """A tool as offered to the model (already namespaced ``<server>_<tool>`` and sanitised)."""

    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass
class ToolCall:
    """A tool call requested by the model. ``arguments`` is a dict, or the raw string when the model
    produced JSON that does not parse (the agent reports that back to the model)."""

    id: str
    name: str
    arguments: dict[str, Any] | str


@dataclass
class ToolOutcome:
    """What one tool call (or one code action) returned, in a provider-neutral form."""

    call_id: str
    name: str
    is_error: bool
    text: str
    images: list[bytes] = field(default_factory=list)  # PNG/JPEG bytes
    image_types: list[str] = field(default_factory=list)  # mime types, parallel to images
    structured: Any = None
    value: Any = None  # code actions: the last expression's value (parsed when it is a literal)
    duration_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "name": self.name, "is_error": self.is_error,
                "text": self.text, "structured": self.structured, "value": self.value,
                "n_images": len(self.images), "duration_s": round(self.duration_s, 3)}


@dataclass
class Message:
    """One turn. ``role`` is "user", "assistant" or "tool".

    user: ``text`` (+ ``outcome`` for a code-action observation, + ``images``);
    assistant: ``text`` and/or ``tool_calls``; tool: ``results`` (one per tool call of the turn before).
    """

    role: str
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    results: list[ToolOutcome] = field(default_factory=list)
    outcome: ToolOutcome | None = None
    images: list[bytes] = field(default_factory=list)
    image_types: list[str] = field(default_factory=list)


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    requests: int = 0
    retries: int = 0
    cost_usd: float | None = 0.0

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.requests += other.requests
        self.retries += other.retries
        if self.cost_usd is None or other.cost_usd is None:
            self.cost_usd = None
        else:
            self.cost_usd = round(self.cost_usd + other.cost_usd, 8)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProviderResponse:
    """One model turn: free text, tool calls (tools mode), token usage."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    stop_reason: str | None = None
    model: str | None = None


class Provider(Protocol):
    name: str
    model: str

    async def complete(self, system: str, messages: list[Message], tools: list[ToolSpec], *,
                       tool_choice: str = "auto") -> ProviderResponse:
        """One model turn for the given conversation and tool list. ``tool_choice="none"`` keeps the
        tools declared (the history may hold tool calls) but asks for a text reply."""
        ...


class ProviderError(Exception):
    """The provider failed for good (bad key, bad request, retries exhausted)."""


# -- prices -------------------------------------------------------------------------------------
# USD per million tokens (input, output), list prices; prefix-matched on the model name. Unknown
# models give cost None (tokens are still counted). Override with CYTOAGENT_PRICE="in,out".
PRICES: dict[str, tuple[float, float]] = {
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-3-5-sonnet": (3.0, 15.0),
    "claude-haiku-4": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25),
    "gpt-4.1-nano": (0.1, 0.4),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4o": (2.5, 10.0),
    "o4-mini": (1.1, 4.4),
    "o3": (2.0, 8.0),
    "scripted": (0.0, 0.0),
}


def price_for(model: str | None, override: tuple[float, float] | None = None) -> tuple[float, float] | None:
    """(input, output) USD per million tokens for a model, longest matching prefix wins."""
    import os

    if override is not None:
        return override
    env = os.environ.get("CYTOAGENT_PRICE")
    if env:
        try:
            a, b = (float(x) for x in env.split(","))
            return a, b
        except ValueError:
            pass
    if not model:
        return None
    best = None
    for prefix, p in PRICES.items():
        if model.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, p)
    return best[1] if best else None


def cost_of(usage: Usage, model: str | None, override: tuple[float, float] | None = None, *,
            cache_read_factor: float = 0.0, cache_write_factor: float = 0.0) -> float | None:
    """USD for one response. Anthropic counts cache reads/writes apart from ``input_tokens`` (billed
    at 0.1x / 1.25x the input price: pass those factors); OpenAI includes them in ``input_tokens``."""
    p = price_for(model, override)
    if p is None:
        return None
    tokens_in = usage.input_tokens + cache_read_factor * usage.cache_read_tokens \
        + cache_write_factor * usage.cache_write_tokens
    return round((tokens_in * p[0] + usage.output_tokens * p[1]) / 1e6, 8)


# -- retries ------------------------------------------------------------------------------------
@dataclass
class RetryPolicy:
    max_retries: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    jitter: float = 0.25


async def with_retries(
    fn: Callable[[], Awaitable[T]],
    *,
    is_retryable: Callable[[BaseException], bool],
    retry_after: Callable[[BaseException], float | None] = lambda e: None,
    policy: RetryPolicy | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> tuple[T, int]:
    """Call ``fn`` until it succeeds; retry retryable errors with exponential backoff (honouring a
    server's Retry-After). Returns (result, number of retries). Non-retryable errors and the last
    retryable one propagate."""
    policy = policy or RetryPolicy()
    attempt = 0
    while True:
        try:
            return await fn(), attempt
        except Exception as e:  # noqa: BLE001 - classified below
            if attempt >= policy.max_retries or not is_retryable(e):
                raise
            delay = retry_after(e)
            if delay is None:
                delay = min(policy.max_delay_s, policy.base_delay_s * (2**attempt))
                delay *= 1 + random.uniform(-policy.jitter, policy.jitter)
            delay = max(0.0, min(float(delay), policy.max_delay_s))
            attempt += 1
            if on_retry is not None:
                on_retry(attempt, e, delay)
            await sleep(delay)


def retryable_sdk_error(e: BaseException, connection_error: type, status_error: type) -> bool:
    """Transient for an SDK (anthropic or openai share the shape): connection errors and timeouts, and
    HTTP 408/409/429/5xx; everything else (bad request, auth) is final."""
    if isinstance(e, connection_error):  # includes timeouts
        return True
    status = getattr(e, "status_code", None)
    return isinstance(e, status_error) and status is not None and (status in (408, 409, 429) or status >= 500)


def header_retry_after(e: BaseException) -> float | None:
    """Seconds from a ``retry-after`` / ``retry-after-ms`` header on an SDK status error, if any."""
    resp = getattr(e, "response", None)
    headers = getattr(resp, "headers", None)
    if not headers:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return float(ms) / 1000.0
        s = headers.get("retry-after")
        if s is not None:
            return float(s)
    except (TypeError, ValueError):
        return None
    return None


def outcome_text_for_model(o: ToolOutcome, limit: int = 20_000) -> str:
    """The text a model sees for a tool outcome (capped, with a note of how much was cut)."""
    text = o.text or ("(no output)" if not o.images else f"({len(o.images)} image(s))")
    if len(text) > limit:
        text = text[:limit] + f"\n… [{len(text) - limit} more characters cut]"
    return text
