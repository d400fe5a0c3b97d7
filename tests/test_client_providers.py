"""Provider adapters: MCP tool → provider schema, responses built with each SDK's own types,
message conversion (images in tool results), retries/backoff on rate limits and transient errors,
token and cost accounting, and a full HTTP round trip against a fake loopback endpoint."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import anthropic
import httpx2
import openai
import pytest
from anthropic.types import Message as AMessage
from anthropic.types import TextBlock, ToolUseBlock
from anthropic.types import Usage as AUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_message_function_tool_call import (
    ChatCompletionMessageFunctionToolCall,
    Function,
)
from openai.types.completion_usage import CompletionUsage

from client.providers import get_provider
from client.providers.anthropic import (
    AnthropicProvider,
    parse_anthropic_response,
    to_anthropic_messages,
    to_anthropic_tools,
)
from client.providers.base import (
    Message,
    ProviderError,
    RetryPolicy,
    ToolCall,
    ToolOutcome,
    ToolSpec,
    Usage,
    cost_of,
    price_for,
    with_retries,
)
from client.providers.openai import OpenAIProvider, parse_openai_response, to_openai_messages, to_openai_tools
from client.servers import NAME_RE, ServerConfig, ServerPool, clean_schema, sanitize_name
from client.testing import load_source

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")  # a PNG header is enough


# -- tool names and schemas ---------------------------------------------------------------------
def test_sanitize_name_rules_and_uniqueness():
    assert sanitize_name("spatial_load") == "spatial_load"
    assert sanitize_name("ext_my.tool/v2") == "ext_my_tool_v2"
    long = "server_" + "x" * 120
    s = sanitize_name(long)
    assert len(s) == 64 and NAME_RE.match(s)
    taken = {"a_b"}
    s2 = sanitize_name("a.b", taken)
    assert s2 != "a_b" and NAME_RE.match(s2)
    t = {sanitize_name(long)}
    s3 = sanitize_name(long, t)
    assert s3 not in t and len(s3) <= 64 and NAME_RE.match(s3)


def test_clean_schema_drops_fastmcp_keys():
    s = clean_schema({"type": "object", "properties": {"a": {"type": "integer", "x-fastmcp-foo": 1}},
                      "x-fastmcp-wrap-result": True})
    assert s == {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert clean_schema(None) == {"type": "object", "properties": {}}


async def test_mcp_tools_to_provider_schemas():
    from fastmcp import FastMCP

    ext = FastMCP("ext")

    @ext.tool(name="weird.name")
    def weird(path: str, limit: int = 5) -> str:
        """Do a thing.

        Args:
            path: A path.
            limit: At most this many.
        """
        return path

    configs = {"calc": ServerConfig.in_memory("calc", load_source("calc")), "ext": ServerConfig.in_memory("ext", ext)}
    async with ServerPool(configs) as pool:
        specs = pool.tools()
        names = {s.name for s in specs}
        assert {"calc_add", "calc_stats", "calc_make_table", "calc_plot", "calc_count", "calc_sleep",
                "ext_weird_name"} == names
        assert pool.tool_map["ext_weird_name"] == ("ext", "weird.name")
        a = {t["name"]: t for t in to_anthropic_tools(specs)}
        o = {t["function"]["name"]: t for t in to_openai_tools(specs)}
        w = a["ext_weird_name"]
        assert w["description"].startswith("[ext] Do a thing.")
        assert w["input_schema"]["required"] == ["path"]
        assert w["input_schema"]["properties"]["limit"] == {"default": 5, "description": "At most this many.",
                                                            "type": "integer"}
        assert o["calc_add"]["type"] == "function"
        assert o["calc_add"]["function"]["parameters"]["required"] == ["a", "b"]
        assert all(NAME_RE.match(n) for n in names)
        assert not any("x-fastmcp" in json.dumps(t) for t in a.values())


# -- parsing responses built with the SDKs' own types -------------------------------------------
def test_parse_anthropic_message():
    msg = AMessage(id="msg_1", type="message", role="assistant", model="claude-sonnet-4-5", stop_reason="tool_use",
                   content=[TextBlock(type="text", text="Let me load it."),
                            ToolUseBlock(type="tool_use", id="toolu_1", name="spatial_load", input={"path": "a.h5ad"})],
                   usage=AUsage(input_tokens=1200, output_tokens=80, cache_read_input_tokens=100))
    r = parse_anthropic_response(msg)
    assert r.text == "Let me load it."
    assert [(c.id, c.name, c.arguments) for c in r.tool_calls] == [("toolu_1", "spatial_load", {"path": "a.h5ad"})]
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.cache_read_tokens) == (1200, 80, 100)
    assert r.stop_reason == "tool_use"
    assert parse_anthropic_response(msg.model_dump()).tool_calls[0].arguments == {"path": "a.h5ad"}


def _chat(tool_calls=None, content=None, finish="tool_calls"):
    return ChatCompletion(id="c1", object="chat.completion", created=0, model="gpt-4.1",
                          choices=[Choice(index=0, finish_reason=finish, message=ChatCompletionMessage(
                              role="assistant", content=content, tool_calls=tool_calls))],
                          usage=CompletionUsage(prompt_tokens=900, completion_tokens=40, total_tokens=940))


def test_parse_openai_completion_incl_bad_json_arguments():
    calls = [ChatCompletionMessageFunctionToolCall(id="call_1", type="function",
                                                   function=Function(name="calc_add", arguments='{"a": 1, "b": 2}')),
             ChatCompletionMessageFunctionToolCall(id="call_2", type="function",
                                                   function=Function(name="calc_add", arguments='{"a": 1, "b":'))]
    r = parse_openai_response(_chat(calls))
    assert r.tool_calls[0].arguments == {"a": 1, "b": 2}
    assert r.tool_calls[1].arguments == '{"a": 1, "b":'  # kept raw: the agent tells the model
    assert (r.usage.input_tokens, r.usage.output_tokens) == (900, 40)
    r2 = parse_openai_response(_chat(None, "<answer>7</answer>", "stop").model_dump())
    assert r2.text == "<answer>7</answer>" and not r2.tool_calls


# -- message conversion -------------------------------------------------------------------------
def _history(n_image_turns=1):
    msgs = [Message("user", text="q")]
    for i in range(n_image_turns):
        call = ToolCall(f"t{i}", "calc_plot", {"n": i})
        msgs += [Message("assistant", text="", tool_calls=[call]),
                 Message("tool", results=[ToolOutcome(f"t{i}", "calc_plot", i == 0, f"out{i}", images=[PNG],
                                                      image_types=["image/png"])])]
    return msgs


def test_anthropic_messages_tool_results_with_images():
    out = to_anthropic_messages(_history(1))
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    assert out[1]["content"] == [{"type": "tool_use", "id": "t0", "name": "calc_plot", "input": {"n": 0}}]
    tr = out[2]["content"][0]
    assert tr["type"] == "tool_result" and tr["tool_use_id"] == "t0" and tr["is_error"] is True
    assert tr["content"][0] == {"type": "text", "text": "out0"}
    assert tr["content"][1]["type"] == "image" and tr["content"][1]["source"]["media_type"] == "image/png"
    # only the last 3 turns with images keep them
    many = to_anthropic_messages(_history(5))
    kinds = [b["type"] for m in many if m["role"] == "user" for c in m["content"] if c["type"] == "tool_result"
             for b in c["content"]]
    assert kinds.count("image") == 3


def test_openai_messages_images_follow_tool_message():
    out = to_openai_messages("SYS", _history(1))
    assert out[0] == {"role": "system", "content": "SYS"}
    assert out[2]["tool_calls"][0]["function"] == {"name": "calc_plot", "arguments": '{"n": 0}'}
    assert out[3] == {"role": "tool", "tool_call_id": "t0", "content": "ERROR: out0"}
    assert out[4]["role"] == "user" and out[4]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert len(to_openai_messages("S", _history(1), send_images=False)) == 4


# -- retries, errors, accounting ----------------------------------------------------------------
def _resp(status, headers=None):
    return httpx2.Response(status, headers=headers or {}, request=httpx2.Request("POST", "http://x/v1/messages"))


class _FakeMessages:
    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.calls = []

    async def create(self, **kw):
        self.calls.append(kw)
        o = self.outcomes.pop(0)
        if isinstance(o, Exception):
            raise o
        return o


class _FakeAnthropic:
    def __init__(self, outcomes):
        self.messages = _FakeMessages(outcomes)


def _amsg(text="<answer>ok</answer>"):
    return AMessage(id="m", type="message", role="assistant", model="claude-sonnet-4-5", stop_reason="end_turn",
                    content=[TextBlock(type="text", text=text)], usage=AUsage(input_tokens=1000, output_tokens=500))


async def test_anthropic_retries_rate_limit_and_overload_then_succeeds():
    retries = []
    fake = _FakeAnthropic([
        anthropic.RateLimitError("slow down", response=_resp(429, {"retry-after": "0.01"}), body=None),
        anthropic.InternalServerError("overloaded", response=_resp(529), body=None),
        anthropic.APIConnectionError(request=_resp(200).request),
        _amsg()])
    p = AnthropicProvider("claude-sonnet-4-5", client=fake, retry=RetryPolicy(base_delay_s=0.001),
                          on_retry=lambda n, e, d: retries.append((n, type(e).__name__, d)))
    r = await p.complete("sys", [Message("user", text="q")], [ToolSpec("calc_add", "add", {"type": "object"})])
    assert r.text == "<answer>ok</answer>"
    assert [(n, name) for n, name, _ in retries] == [(1, "RateLimitError"), (2, "InternalServerError"),
                                                     (3, "APIConnectionError")]
    assert retries[0][2] == pytest.approx(0.01)  # Retry-After honoured
    assert r.usage.retries == 3 and r.usage.requests == 1
    assert r.usage.cost_usd == pytest.approx((1000 * 3 + 500 * 15) / 1e6)
    sent = fake.messages.calls[-1]
    assert sent["model"] == "claude-sonnet-4-5"
    assert sent["system"] == [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}]
    assert sent["tools"] == [{"name": "calc_add", "description": "add", "input_schema": {"type": "object"}}]
    assert "tool_choice" not in sent
    assert p.request("s", [Message("user", text="q")], [ToolSpec("a", "", {"type": "object"})],
                     "none")["tool_choice"] == {"type": "none"}


async def test_anthropic_non_retryable_and_exhausted_errors_become_provider_errors():
    fake = _FakeAnthropic([anthropic.AuthenticationError("bad key", response=_resp(401), body=None)])
    p = AnthropicProvider("claude-sonnet-4-5", client=fake, retry=RetryPolicy(base_delay_s=0.001))
    with pytest.raises(ProviderError, match="AuthenticationError"):
        await p.complete("", [Message("user", text="q")], [])
    assert len(fake.messages.calls) == 1  # not retried
    errs = [anthropic.RateLimitError("x", response=_resp(429), body=None) for _ in range(3)]
    p2 = AnthropicProvider("m", client=_FakeAnthropic(errs), retry=RetryPolicy(max_retries=2, base_delay_s=0.001))
    with pytest.raises(ProviderError, match="RateLimitError"):
        await p2.complete("", [Message("user", text="q")], [])


async def test_with_retries_backoff_is_exponential():
    delays = []

    async def fake_sleep(d):
        delays.append(d)

    n = {"i": 0}

    async def flaky():
        n["i"] += 1
        if n["i"] < 4:
            raise TimeoutError("transient")
        return "done"

    out, retries = await with_retries(flaky, is_retryable=lambda e: isinstance(e, TimeoutError),
                                      policy=RetryPolicy(base_delay_s=1.0, jitter=0.0), sleep=fake_sleep)
    assert (out, retries, delays) == ("done", 3, [1.0, 2.0, 4.0])
    with pytest.raises(ValueError):
        await with_retries(lambda: _raise(ValueError("no")), is_retryable=lambda e: False, sleep=fake_sleep)


async def _raise(e):
    raise e


def test_prices_and_usage_accounting(monkeypatch):
    monkeypatch.delenv("CYTOAGENT_PRICE", raising=False)
    assert price_for("claude-sonnet-4-5-20250929") == (3.0, 15.0)
    assert price_for("gpt-4.1-mini") == (0.4, 1.6)  # longest prefix wins over gpt-4.1
    assert price_for("my-local-llama") is None
    u = Usage(input_tokens=2_000_000, output_tokens=1_000_000)
    assert cost_of(u, "gpt-4o") == pytest.approx(15.0)
    assert cost_of(u, "unknown") is None
    cached = Usage(input_tokens=1_000_000, cache_read_tokens=1_000_000, cache_write_tokens=1_000_000)
    assert cost_of(cached, "claude-sonnet-4", cache_read_factor=0.1, cache_write_factor=1.25) == pytest.approx(
        3.0 * (1 + 0.1 + 1.25))
    monkeypatch.setenv("CYTOAGENT_PRICE", "1,2")
    assert cost_of(u, "unknown") == pytest.approx(4.0)
    total = Usage(input_tokens=1, output_tokens=2, requests=1, cost_usd=0.5)
    total.add(Usage(input_tokens=3, output_tokens=4, requests=1, retries=2, cost_usd=0.25))
    assert (total.input_tokens, total.output_tokens, total.requests, total.retries, total.cost_usd) == (4, 6, 2, 2, 0.75)
    total.add(Usage(cost_usd=None))
    assert total.cost_usd is None


def test_missing_keys_and_unknown_provider(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ProviderError, match="ANTHROPIC_API_KEY"):
        get_provider("anthropic")
    with pytest.raises(ProviderError, match="OPENAI_API_KEY"):
        get_provider("openai")
    with pytest.raises(ProviderError, match="base-url"):
        get_provider("openai-compatible", model="llama")
    with pytest.raises(ProviderError, match="--plan"):
        get_provider("scripted")
    with pytest.raises(ProviderError, match="Unknown provider"):
        get_provider("gemini")
    p = get_provider("openai-compatible", model="llama", base_url="http://127.0.0.1:9/v1")
    assert p.name == "openai-compatible" and p.model == "llama"


# -- full HTTP round trip on loopback -----------------------------------------------------------
class _Fake(BaseHTTPRequestHandler):
    queue: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        status, headers, payload = type(self).queue.pop(0)
        data = json.dumps(payload).encode()
        self.send_response(status)
        for k, v in {"content-type": "application/json", **headers}.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_endpoint(monkeypatch):
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    _Fake.queue, _Fake.seen = [], []
    srv = HTTPServer(("127.0.0.1", 0), _Fake)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Fake
    srv.shutdown()
    srv.server_close()


async def test_anthropic_http_round_trip(fake_endpoint):
    url, fake = fake_endpoint
    ok = _amsg().model_dump(mode="json", exclude_none=True)
    ok["content"] = [{"type": "tool_use", "id": "toolu_9", "name": "calc_add", "input": {"a": 1, "b": 2}}]
    ok["stop_reason"] = "tool_use"
    fake.queue = [(429, {"retry-after": "0"}, {"type": "error", "error": {"type": "rate_limit_error",
                                                                          "message": "slow"}}), (200, {}, ok)]
    p = AnthropicProvider("claude-sonnet-4-5", api_key="sk-ant-test-0000", base_url=url,
                          retry=RetryPolicy(base_delay_s=0.001))
    hist = _history(1)
    r = await p.complete("SYS", hist, [ToolSpec("calc_add", "add", {"type": "object", "properties": {}})])
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("calc_add", {"a": 1, "b": 2})]
    assert r.usage.retries == 1 and len(fake.seen) == 2
    path, headers, body = fake.seen[-1]
    assert path == "/v1/messages"
    assert "sk-ant-test-0000" in (headers.get("x-api-key", "") + headers.get("authorization", ""))
    assert body["tools"][0]["name"] == "calc_add" and body["system"][0]["text"] == "SYS"
    assert body["messages"][2]["content"][0]["content"][1]["type"] == "image"


async def test_openai_compatible_http_round_trip(fake_endpoint):
    url, fake = fake_endpoint
    ok = _chat([ChatCompletionMessageFunctionToolCall(
        id="call_7", type="function", function=Function(name="calc_stats", arguments='{"values": [1, 2]}'))])
    fake.queue = [(503, {}, {"error": {"message": "busy"}}), (200, {}, ok.model_dump(mode="json", exclude_none=True))]
    p = OpenAIProvider("qwen", base_url=url + "/v1", compatible=True, retry=RetryPolicy(base_delay_s=0.001))
    r = await p.complete("SYS", _history(1), [ToolSpec("calc_stats", "stats", {"type": "object", "properties": {}})])
    assert [(c.id, c.name, c.arguments) for c in r.tool_calls] == [("call_7", "calc_stats", {"values": [1, 2]})]
    assert r.usage.retries == 1 and r.usage.cost_usd == 0.0  # local endpoint: free
    path, _headers, body = fake.seen[-1]
    assert path == "/v1/chat/completions" and body["model"] == "qwen"
    assert body["tools"][0]["function"]["name"] == "calc_stats"
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool", "user"]
    assert "tool_choice" not in body
    fake.queue = [(200, {}, _chat(None, "<answer>1</answer>", "stop").model_dump(mode="json", exclude_none=True))]
    await p.complete("SYS", [Message("user", text="q")], [ToolSpec("calc_stats", "s", {"type": "object"})],
                     tool_choice="none")
    assert fake.seen[-1][2]["tool_choice"] == "none"
    with pytest.raises(ProviderError):
        fake.queue = [(400, {}, {"error": {"message": "bad request"}})]
        await p.complete("SYS", [Message("user", text="q")], [])
    assert isinstance(openai.BadRequestError, type)


async def test_full_agent_loop_through_fake_openai_and_anthropic_endpoints(fake_endpoint, tmp_path):
    """The whole loop with real SDK clients on loopback: tool call → MCP tool → result back → answer."""
    from client.agent import run_agent

    url, fake = fake_endpoint
    calc = {"calc": ServerConfig.in_memory("calc", load_source("calc"))}
    call = _chat([ChatCompletionMessageFunctionToolCall(
        id="call_1", type="function", function=Function(name="calc_stats", arguments='{"values": [1, 2, 6]}'))])
    fake.queue = [(200, {}, call.model_dump(mode="json", exclude_none=True)),
                  (200, {}, _chat(None, 'The mean is 3. <answer>{"mean": 3}</answer>', "stop").model_dump(
                      mode="json", exclude_none=True))]
    p = OpenAIProvider("gpt-4.1", api_key="sk-test-openai-000000", base_url=url + "/v1",
                       retry=RetryPolicy(base_delay_s=0.001))
    res = await run_agent("Mean of 1, 2, 6? JSON", p, servers=calc, out_dir=tmp_path / "o")
    assert res.ok and res.answer == {"mean": 3}
    tool_msg = fake.seen[1][2]["messages"][-1]
    assert tool_msg["role"] == "tool" and tool_msg["tool_call_id"] == "call_1"
    assert json.loads(tool_msg["content"]) == {"n": 3, "mean": 3.0, "min": 1.0, "max": 6.0, "sum": 9.0}
    assert res.usage.input_tokens == 1800 and res.usage.cost_usd == pytest.approx(2 * (900 * 2 + 40 * 8) / 1e6)

    fake.seen.clear()
    use = _amsg().model_dump(mode="json", exclude_none=True)
    use["content"] = [{"type": "tool_use", "id": "toolu_1", "name": "calc_plot", "input": {"n": 2}}]
    use["stop_reason"] = "tool_use"
    fake.queue = [(200, {}, use), (200, {}, _amsg("<answer>16</answer>").model_dump(mode="json", exclude_none=True))]
    a = AnthropicProvider("claude-sonnet-4-5", api_key="sk-ant-test-000000", base_url=url,
                          retry=RetryPolicy(base_delay_s=0.001))
    res = await run_agent("Side of the 2x2 board in px?", a, servers=calc, out_dir=tmp_path / "a")
    assert res.ok and res.answer == 16
    result_block = fake.seen[1][2]["messages"][-1]["content"][0]
    assert result_block["type"] == "tool_result" and result_block["tool_use_id"] == "toolu_1"
    assert result_block["content"][0] == {"type": "text", "text": '{"side_px": 16}'}
    assert result_block["content"][1]["type"] == "image"  # the figure went back to the model
    assert (tmp_path / "a" / "figures").is_dir()


async def test_identical_tools_of_our_servers_are_offered_once(tmp_path, workspace_dir):
    """Every cytoagent server has list_artifacts/artifact_info/… over the same workspace: offer once."""
    from fastmcp import FastMCP

    from client.servers import ServerConfig

    def make(name):
        m = FastMCP(name)

        @m.tool
        def shared(x: int) -> int:
            """Same everywhere."""
            return x

        @m.tool(name=f"own_{name}")
        def own() -> str:
            """Specific."""
            return name

        return m

    cfgs = {n: ServerConfig(name=n, server=make(n), source="cytoagent") for n in ("a", "b")}
    cfgs["ext"] = ServerConfig(name="ext", server=make("ext"), source="external")
    async with ServerPool(cfgs) as pool:
        offered = {t.name: t.description for t in pool.tools()}
        assert set(offered) == {"a_shared", "a_own_a", "b_own_b", "ext_shared", "ext_own_ext"}
        assert offered["a_shared"].startswith("[a, b] Same everywhere.")
        assert (await pool.call("b_shared", {"x": 4})).text == "4"  # hidden copies stay callable
    async with ServerPool(cfgs, dedupe=False) as pool:
        assert len(pool.tools()) == 6
