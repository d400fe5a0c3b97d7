"""Model providers behind one interface (:class:`client.providers.base.Provider`)."""

from __future__ import annotations

from typing import Any

from client.providers.base import Provider, ProviderError

PROVIDERS = ("anthropic", "openai", "openai-compatible", "scripted")


def get_provider(name: str, *, model: str | None = None, base_url: str | None = None, plan: Any = None,
                 api_key_env: str | None = None, **kwargs: Any) -> Provider:
    """A provider by name: "anthropic", "openai", "openai-compatible" (needs ``base_url``) or
    "scripted" (needs ``plan``: a list of steps or a .json/.yaml file)."""
    if name == "scripted":
        if plan is None:
            raise ProviderError("--provider scripted needs --plan FILE (a JSON/YAML list of steps).")
        from client.providers.scripted import ScriptedProvider

        return ScriptedProvider(plan, **kwargs)
    if name == "anthropic":
        from client.providers.anthropic import AnthropicProvider

        extra = {"api_key_env": api_key_env} if api_key_env else {}
        return AnthropicProvider(model, base_url=base_url, **extra, **kwargs)
    if name in ("openai", "openai-compatible"):
        from client.providers.openai import OpenAIProvider

        extra = {"api_key_env": api_key_env} if api_key_env else {}
        return OpenAIProvider(model, base_url=base_url, compatible=name == "openai-compatible", **extra, **kwargs)
    raise ProviderError(f"Unknown provider {name!r}; use one of: {', '.join(PROVIDERS)}.")


__all__ = ["PROVIDERS", "Provider", "ProviderError", "get_provider"]
