"""OpenAI Chat Completions provider (function calling); also any OpenAI-compatible endpoint
(vLLM, Ollama, llama.cpp server, ...) through ``base_url``."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from client.providers.base import (
    Message,
    ProviderError,
    ProviderResponse,
    RetryPolicy,
    ToolCall,
    ToolSpec,
    Usage,
    cost_of,
    header_retry_after,
    outcome_text_for_model,
    retryable_sdk_error,
    with_retries,
)

DEFAULT_MODEL = "gpt-4.1"


def to_openai_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    """Tool specs in the Chat Completions ``tools`` format (``strict`` off: MCP schemas leave optional
    parameters out of ``required``)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description or t.name,
                                              "parameters": t.input_schema}} for t in tools]


def _image_parts(images: list[bytes], types: list[str]) -> list[dict[str, Any]]:
    parts = []
    for i, data in enumerate(images):
        mime = types[i] if i < len(types) else "image/png"
        parts.append({"type": "image_url", "image_url": {
            "url": f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"}})
    return parts


def to_openai_messages(system: str, messages: list[Message], *, send_images: bool = True, image_turns: int = 3,
                       max_chars: int = 20_000) -> list[dict[str, Any]]:
    """Neutral messages → Chat Completions ``messages``. Tool messages take text only, so images a
    tool returned follow in a user message (only for the last ``image_turns`` turns with images)."""
    with_images = [i for i, m in enumerate(messages) if m.images or (m.outcome and m.outcome.images)
                   or any(r.images for r in m.results)]
    keep = set(with_images[-image_turns:]) if (send_images and image_turns > 0) else set()
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, m in enumerate(messages):
        if m.role == "user":
            imgs = list(m.images) + (list(m.outcome.images) if m.outcome else [])
            types = list(m.image_types) + (list(m.outcome.image_types) if m.outcome else [])
            if imgs and i in keep:
                out.append({"role": "user", "content": [{"type": "text", "text": m.text or "(images)"},
                                                        *_image_parts(imgs, types)]})
            else:
                note = f"\n[{len(imgs)} image(s) not shown]" if imgs else ""
                out.append({"role": "user", "content": (m.text or "") + note})
        elif m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": m.text or None}
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": c.arguments if isinstance(c.arguments, str)
                    else json.dumps(c.arguments)}} for c in m.tool_calls]
            elif not m.text:
                msg["content"] = "(no output)"
            out.append(msg)
        elif m.role == "tool":
            extra: list[dict[str, Any]] = []
            for r in m.results:
                text = outcome_text_for_model(r, max_chars)
                out.append({"role": "tool", "tool_call_id": r.call_id,
                            "content": ("ERROR: " + text) if r.is_error else text})
                if r.images:
                    if i in keep:
                        extra.append({"type": "text", "text": f"Image(s) returned by {r.name} (call {r.call_id}):"})
                        extra.extend(_image_parts(r.images, r.image_types))
            if extra:
                out.append({"role": "user", "content": extra})
    return out


def parse_openai_response(resp: Any) -> ProviderResponse:
    """An ``openai.types.chat.ChatCompletion`` (or an equivalent dict) → ProviderResponse.
    Arguments that are not valid JSON are kept as the raw string (the agent tells the model)."""
    if isinstance(resp, dict):
        from openai.types.chat import ChatCompletion

        resp = ChatCompletion.model_validate(resp)
    if not resp.choices:
        raise ProviderError("The model returned no choices.")
    choice = resp.choices[0]
    msg = choice.message
    calls = []
    for tc in msg.tool_calls or []:
        if getattr(tc, "type", "function") != "function":
            continue
        raw = tc.function.arguments or "{}"
        try:
            args: Any = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            args = raw
        if not isinstance(args, (dict, str)):
            args = raw
        calls.append(ToolCall(id=tc.id, name=tc.function.name, arguments=args))
    u = resp.usage
    usage = Usage(requests=1)
    if u is not None:
        usage.input_tokens = u.prompt_tokens or 0
        usage.output_tokens = u.completion_tokens or 0
        det = getattr(u, "prompt_tokens_details", None)
        usage.cache_read_tokens = (getattr(det, "cached_tokens", None) or 0) if det else 0
    text = msg.content or ""
    if not text and msg.refusal:
        text = msg.refusal
    return ProviderResponse(text=text, tool_calls=calls, usage=usage, stop_reason=choice.finish_reason,
                            model=resp.model)


def is_retryable(e: BaseException) -> bool:
    import openai

    return retryable_sdk_error(e, openai.APIConnectionError, openai.APIStatusError)


class OpenAIProvider:
    """``name`` is "openai" or "openai-compatible" (a ``base_url`` endpoint; the key is optional)."""

    def __init__(self, model: str | None = None, *, api_key: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 base_url: str | None = None, compatible: bool = False, max_tokens: int | None = 8192,
                 temperature: float | None = None, retry: RetryPolicy | None = None, client: Any = None,
                 request_timeout_s: float = 600, send_images: bool = True,
                 price: tuple[float, float] | None = None, on_retry=None):
        self.name = "openai-compatible" if compatible else "openai"
        if compatible and not model:
            raise ProviderError("An OpenAI-compatible endpoint needs --model (the name the server serves).")
        self.model = model or DEFAULT_MODEL
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retry = retry or RetryPolicy()
        self.send_images = send_images
        self.price = price if price is not None else ((0.0, 0.0) if compatible else None)
        self.on_retry = on_retry
        self.compatible = compatible
        if client is None:
            import openai

            key = api_key or os.environ.get(api_key_env)
            if not key:
                if not compatible:
                    raise ProviderError(f"No OpenAI API key: set {api_key_env} (or use --provider scripted with "
                                        "--plan to run without a key).")
                key = "not-needed"
            if compatible and not base_url:
                raise ProviderError("--provider openai-compatible needs --base-url (e.g. http://localhost:8000/v1).")
            client = openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=request_timeout_s)
        self.client = client

    def request(self, system: str, messages: list[Message], tools: list[ToolSpec],
                tool_choice: str = "auto") -> dict[str, Any]:
        req: dict[str, Any] = {"model": self.model,
                               "messages": to_openai_messages(system, messages, send_images=self.send_images)}
        if tools:
            req["tools"] = to_openai_tools(tools)
            if tool_choice != "auto":
                req["tool_choice"] = tool_choice
        if self.max_tokens:
            req["max_completion_tokens" if not self.compatible else "max_tokens"] = self.max_tokens
        if self.temperature is not None:
            req["temperature"] = self.temperature
        return req

    async def complete(self, system: str, messages: list[Message], tools: list[ToolSpec], *,
                       tool_choice: str = "auto") -> ProviderResponse:
        import openai

        req = self.request(system, messages, tools, tool_choice)
        try:
            resp, retries = await with_retries(lambda: self.client.chat.completions.create(**req),
                                               is_retryable=is_retryable, retry_after=header_retry_after,
                                               policy=self.retry, on_retry=self.on_retry)
        except openai.APIError as e:
            raise ProviderError(f"OpenAI API error: {type(e).__name__}: {getattr(e, 'message', e)}") from e
        out = parse_openai_response(resp)
        out.usage.retries = retries
        out.usage.cost_usd = cost_of(out.usage, self.model, self.price)
        return out
