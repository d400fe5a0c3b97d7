"""Anthropic Messages API provider: tool use, images in tool results, retries, token accounting."""

from __future__ import annotations

import base64
import os
from typing import Any

from client.providers.base import (
    Message,
    ProviderError,
    ProviderResponse,
    RetryPolicy,
    ToolCall,
    ToolOutcome,
    ToolSpec,
    Usage,
    cost_of,
    header_retry_after,
    outcome_text_for_model,
    retryable_sdk_error,
    with_retries,
)

DEFAULT_MODEL = "claude-sonnet-4-5"
IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}


def to_anthropic_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    """Tool specs in the Messages API ``tools`` format."""
    return [{"name": t.name, "description": t.description or t.name, "input_schema": t.input_schema} for t in tools]


def _image_block(data: bytes, mime: str) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": mime,
                                        "data": base64.b64encode(data).decode("ascii")}}


def _images(o_images: list[bytes], o_types: list[str], keep: bool) -> list[dict[str, Any]]:
    blocks = []
    for i, data in enumerate(o_images):
        mime = o_types[i] if i < len(o_types) else "image/png"
        if not keep:
            blocks.append({"type": "text", "text": f"[image {i + 1} omitted from older turns]"})
        elif mime in IMAGE_TYPES:
            blocks.append(_image_block(data, mime))
    return blocks


def _outcome_blocks(o: ToolOutcome, keep_images: bool, max_chars: int) -> list[dict[str, Any]]:
    return [{"type": "text", "text": outcome_text_for_model(o, max_chars)}, *_images(o.images, o.image_types,
                                                                                      keep_images)]


def to_anthropic_messages(messages: list[Message], *, image_turns: int = 3, max_chars: int = 20_000) -> list[dict]:
    """Neutral messages → Messages API ``messages`` (consecutive user turns merged). Images are
    sent only for the last ``image_turns`` turns that carry any, to bound the context size."""
    with_images = [i for i, m in enumerate(messages) if m.images or (m.outcome and m.outcome.images)
                   or any(r.images for r in m.results)]
    keep = set(with_images[-image_turns:]) if image_turns > 0 else set()
    out: list[dict] = []

    def push(role: str, blocks: list[dict]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for i, m in enumerate(messages):
        if m.role == "user":
            blocks: list[dict] = []
            if m.text:
                blocks.append({"type": "text", "text": m.text})
            blocks += _images(m.images, m.image_types, i in keep)
            if m.outcome is not None:
                blocks += _images(m.outcome.images, m.outcome.image_types, i in keep)
            push("user", blocks)
        elif m.role == "assistant":
            blocks = [{"type": "text", "text": m.text}] if m.text.strip() else []
            for c in m.tool_calls:
                args = c.arguments if isinstance(c.arguments, dict) else {}
                blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": args})
            push("assistant", blocks or [{"type": "text", "text": "(no output)"}])
        elif m.role == "tool":
            push("user", [{"type": "tool_result", "tool_use_id": r.call_id, "is_error": r.is_error,
                           "content": _outcome_blocks(r, i in keep, max_chars)} for r in m.results])
    return out


def parse_anthropic_response(resp: Any) -> ProviderResponse:
    """An ``anthropic.types.Message`` (or an equivalent dict) → ProviderResponse."""
    if isinstance(resp, dict):
        from anthropic.types import Message as AMessage

        resp = AMessage.model_validate(resp)
    texts, calls = [], []
    for b in resp.content:
        if b.type == "text":
            texts.append(b.text)
        elif b.type == "tool_use":
            calls.append(ToolCall(id=b.id, name=b.name, arguments=dict(b.input or {})))
    u = resp.usage
    usage = Usage(input_tokens=u.input_tokens or 0, output_tokens=u.output_tokens or 0,
                  cache_read_tokens=u.cache_read_input_tokens or 0,
                  cache_write_tokens=u.cache_creation_input_tokens or 0, requests=1)
    return ProviderResponse(text="\n".join(texts), tool_calls=calls, usage=usage, stop_reason=resp.stop_reason,
                            model=str(resp.model))


def is_retryable(e: BaseException) -> bool:
    import anthropic

    return retryable_sdk_error(e, anthropic.APIConnectionError, anthropic.APIStatusError)


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, model: str | None = None, *, api_key: str | None = None, api_key_env: str = "ANTHROPIC_API_KEY",
                 base_url: str | None = None, max_tokens: int = 8192, temperature: float | None = None,
                 retry: RetryPolicy | None = None, client: Any = None, request_timeout_s: float = 600,
                 price: tuple[float, float] | None = None, on_retry=None, prompt_cache: bool = True):
        self.model = model or DEFAULT_MODEL
        self.prompt_cache = prompt_cache
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retry = retry or RetryPolicy()
        self.price = price
        self.on_retry = on_retry
        if client is None:
            import anthropic

            key = api_key or os.environ.get(api_key_env)
            if not key:
                raise ProviderError(f"No Anthropic API key: set {api_key_env} (or use --provider scripted "
                                    "with --plan to run without a key).")
            client = anthropic.AsyncAnthropic(api_key=key, base_url=base_url, max_retries=0,
                                              timeout=request_timeout_s)
        self.client = client

    def request(self, system: str, messages: list[Message], tools: list[ToolSpec],
                tool_choice: str = "auto") -> dict[str, Any]:
        req: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens,
                               "messages": to_anthropic_messages(messages)}
        # tools and the system prompt are the same every turn: one cache breakpoint at the end of
        # that prefix (tools come before the system prompt in the cache order)
        cache = {"cache_control": {"type": "ephemeral"}} if self.prompt_cache else {}
        if tools:
            req["tools"] = to_anthropic_tools(tools)
            if cache and not system:
                req["tools"][-1] = {**req["tools"][-1], **cache}
        if system:
            req["system"] = [{"type": "text", "text": system, **cache}]
        if tools and tool_choice != "auto":
            req["tool_choice"] = {"type": tool_choice}
        if self.temperature is not None:
            req["temperature"] = self.temperature
        return req

    async def complete(self, system: str, messages: list[Message], tools: list[ToolSpec], *,
                       tool_choice: str = "auto") -> ProviderResponse:
        import anthropic

        req = self.request(system, messages, tools, tool_choice)
        try:
            resp, retries = await with_retries(lambda: self.client.messages.create(**req), is_retryable=is_retryable,
                                               retry_after=header_retry_after, policy=self.retry,
                                               on_retry=self.on_retry)
        except anthropic.APIError as e:
            raise ProviderError(f"Anthropic API error: {type(e).__name__}: {getattr(e, 'message', e)}") from e
        out = parse_anthropic_response(resp)
        out.usage.retries = retries
        out.usage.cost_usd = cost_of(out.usage, self.model, self.price, cache_read_factor=0.1,
                                     cache_write_factor=1.25)
        return out
