'''The scripted provider: replays a fixed plan through the same agent loop the LLM providers use.

Used for tests, demos and reference solutions (the evals' reference plans). It emits the same
provider-level turns an LLM would (tool calls in tools mode, fenced Python in code mode), so the
agent loop, the MCP calls, the transcript and the report follow exactly the same code path.

Plan format
-----------
A plan is a JSON/YAML list of steps (or a mapping with a ``steps`` list). Each step is one dict:

``{"call": "<server>_<tool>", "args": {...}}``
    Tools mode: call one MCP tool by its namespaced name (e.g. ``spatial_load_dataset``; the names
    are shown by ``cytoagent ask --list-tools``). ``args`` defaults to ``{}``.
``{"code": "python source"}``
    Run Python in the sandbox server's ``execute`` tool, in the run's persistent session
    (variables survive between code steps). In code mode it is emitted as a fenced
    ```` ```python ```` block (a code action); in tools mode as a call to ``sandbox_execute``.
``{"answer": <string or any JSON value>}``
    The final answer; ends the run. A plan without one ends with answer ``None``.

Optional keys on call/code steps: ``"allow_error": true`` (go on when the step fails; otherwise a
failed step stops the plan with an error naming the step), ``"note": "..."`` (shown as the
assistant's text in the transcript), ``"timeout_s"`` (code steps: passed to ``execute``).

Templates
---------
``args``, ``code`` and ``answer`` may refer to the results of earlier steps with ``{{ ... }}``:

- ``{{steps[0].structured.artifact_id}}`` — structured content of step 0 (the tool's JSON result)
- ``{{last.structured.x.y}}`` — the most recent call/code step; ``steps[-2]`` also works
- ``{{steps[2].text}}`` — the text content; ``{{steps[2].json.key}}`` — that text parsed as JSON
- ``{{steps[1].value}}`` — a code step's last-expression value (parsed into JSON when it is a
  Python literal such as ``42``, ``'abc'``, ``{'a': 1.5}``; ``np.float64(3.5)`` becomes ``3.5``)
- ``{{steps[1].is_error}}``, ``{{steps[0].structured.rows[0]['cell_type']}}`` — indexing with
  ``[int]`` and ``['key']``/``["key"]`` is allowed anywhere in the path.

``steps[i]`` is the result of plan step ``i`` (0-based, counting every step). When a template is
the whole string the raw JSON value is substituted (``"{{steps[0].structured.n}}"`` → ``42``, a
number); inside a longer string it is formatted (strings as they are, other values as JSON).
A path that does not exist is an error naming the step and the missing key.

Example (YAML)::

    - call: spatial_load_dataset
      args: {path: spatial/cosmx_lung12_mini}
    - call: spatial_cluster_cells
      args: {dataset: "{{steps[0].structured.dataset}}", n_clusters: 4}
    - call: spatial_neighborhood_enrichment
      args: {dataset: "{{steps[1].structured.dataset}}", cluster_key: cluster, n_perms: 100}
    - call: spatial_artifact_info
      args: {artifact_id: "{{steps[2].structured.table_artifact}}"}
    - code: |
        import pandas as pd
        z = pd.read_parquet("{{steps[3].structured.abspath}}")
        round(float(z.zscore.max()), 3)
    - answer: {n_cells: "{{steps[0].structured.n_cells}}", max_z: "{{steps[4].value}}"}
'''

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

from client.providers.base import (
    Message,
    ProviderError,
    ProviderResponse,
    ToolCall,
    ToolOutcome,
    ToolSpec,
    Usage,
)

_TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_TOKEN = re.compile(r"""\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*(-?\d+)\s*\]|\[\s*'([^']*)'\s*\]|\[\s*"([^"]*)"\s*\]""")
_HEAD = re.compile(r"^(steps\s*\[\s*(-?\d+)\s*\]|last)")
_NP_WRAPPER = re.compile(r"\b(?:np|numpy)\.[A-Za-z0-9_]+\(([^()]*)\)")


class PlanError(ProviderError):
    """The plan is malformed, a template does not resolve, or a step failed."""


# -- loading ------------------------------------------------------------------------------------
def load_plan(source: str | Path | list | dict) -> list[dict]:
    """A plan from a list, a ``{"steps": [...]}`` mapping, or a .json/.yaml/.yml file; validated."""
    if isinstance(source, (str, Path)) and not (isinstance(source, str) and source.lstrip().startswith(("[", "{"))):
        p = Path(source).expanduser()
        if not p.is_file():
            raise PlanError(f"Plan file {p} does not exist. Pass a .json or .yaml file with a list of steps.")
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in {".yaml", ".yml"}:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise PlanError(f"Plan file {p} is not valid YAML: {e}") from e
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise PlanError(f"Plan file {p} is not valid JSON: {e}") from e
    elif isinstance(source, str):
        try:
            data = json.loads(source)
        except json.JSONDecodeError as e:
            raise PlanError(f"Plan text is not valid JSON: {e}") from e
    else:
        data = source
    if isinstance(data, dict):
        data = data.get("steps", data.get("plan"))
    if not isinstance(data, list) or not data:
        raise PlanError("A plan must be a non-empty list of steps (or a mapping with a 'steps' list).")
    for i, step in enumerate(data):
        validate_step(i, step)
    return data


def validate_step(i: int, step: Any) -> None:
    if not isinstance(step, dict):
        raise PlanError(f"Plan step {i} is {type(step).__name__}; each step must be a mapping.")
    kinds = [k for k in ("call", "code", "answer") if k in step]
    if len(kinds) != 1:
        raise PlanError(f"Plan step {i} must have exactly one of 'call', 'code', 'answer' (has {kinds or 'none'}).")
    if "call" in step:
        if not isinstance(step["call"], str) or not step["call"]:
            raise PlanError(f"Plan step {i}: 'call' must be a tool name like 'spatial_load_dataset'.")
        if not isinstance(step.get("args", {}), dict):
            raise PlanError(f"Plan step {i}: 'args' must be a mapping of argument names to values.")
    if "code" in step and not isinstance(step["code"], str):
        raise PlanError(f"Plan step {i}: 'code' must be a string of Python source.")


# -- templates ----------------------------------------------------------------------------------
def step_view(o: ToolOutcome | None) -> dict[str, Any]:
    """What templates can reach in one step's result."""
    if o is None:
        return {}
    view: dict[str, Any] = {"structured": o.structured, "text": o.text, "value": o.value,
                            "is_error": o.is_error, "name": o.name, "images": len(o.images)}
    try:
        view["json"] = json.loads(o.text)
    except (TypeError, ValueError):
        view["json"] = None
    return view


def resolve_path(expr: str, results: list[dict | None]) -> Any:
    """Evaluate one template expression (``steps[0].structured.a['b'][1]`` or ``last.text``)."""
    m = _HEAD.match(expr)
    if not m:
        raise PlanError(f"Template {{{{{expr}}}}} must start with steps[N] or last.")
    if m.group(1) == "last":
        done = [r for r in results if r is not None]
        if not done:
            raise PlanError(f"Template {{{{{expr}}}}} refers to 'last' but no step has run yet.")
        cur: Any = done[-1]
        where = "last"
    else:
        idx = int(m.group(2))
        try:
            cur = results[idx]
        except IndexError:
            cur = None
        if cur is None:
            raise PlanError(f"Template {{{{{expr}}}}}: step {idx} has no result (not run yet, or an answer step).")
        where = f"steps[{idx}]"
    rest = expr[m.end():]
    pos = 0
    while pos < len(rest):
        t = _TOKEN.match(rest, pos)
        if not t:
            raise PlanError(f"Template {{{{{expr}}}}}: cannot parse {rest[pos:]!r}; use .key, [0] or ['key'].")
        key: Any = t.group(1) if t.group(1) is not None else (
            int(t.group(2)) if t.group(2) is not None else (t.group(3) if t.group(3) is not None else t.group(4)))
        try:
            cur = cur[key]
        except (KeyError, IndexError, TypeError):
            have = list(cur)[:20] if isinstance(cur, dict) else type(cur).__name__
            raise PlanError(f"Template {{{{{expr}}}}}: {where} has no {key!r} (available: {have}).") from None
        where += f".{key}" if isinstance(key, str) else f"[{key}]"
        pos = t.end()
    return cur


def render(obj: Any, results: list[dict | None]) -> Any:
    """Substitute templates recursively in strings, lists and dict values."""
    if isinstance(obj, str):
        whole = _TEMPLATE.fullmatch(obj.strip())
        if whole and obj.strip().count("{{") == 1:
            return resolve_path(whole.group(1), results)

        def sub(m: re.Match) -> str:
            v = resolve_path(m.group(1), results)
            return v if isinstance(v, str) else json.dumps(v)

        return _TEMPLATE.sub(sub, obj)
    if isinstance(obj, list):
        return [render(x, results) for x in obj]
    if isinstance(obj, dict):
        return {k: render(v, results) for k, v in obj.items()}
    return obj


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list, set, frozenset)):
        items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
        return [_jsonable(x) for x in items]
    if isinstance(v, dict):
        return {(k if isinstance(k, str) else json.dumps(_jsonable(k))): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (bytes, complex)):
        raise TypeError("not JSON")
    return v


def parse_value(value: Any) -> Any:
    """A code step's last-expression value as JSON-able data when it is a (numpy-wrapped) literal:
    tuples and sets become lists; anything else (``array([1, 2])``) stays the repr string."""
    if not isinstance(value, str):
        return value
    for candidate in (value, _NP_WRAPPER.sub(r"\1", value)):
        try:
            v = ast.literal_eval(candidate)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            continue
        try:
            return _jsonable(v)
        except TypeError:
            return value
    return value


# -- the provider -------------------------------------------------------------------------------
class ScriptedProvider:
    """Replays a plan (see the module docstring). ``execute_tool`` is the namespaced name of the
    sandbox's execute tool used for code steps in tools mode (found in the tool list when None)."""

    name = "scripted"
    model = "scripted"
    wrap_up = False  # a plan has no "best answer so far" turn when the step limit is reached

    def __init__(self, plan: str | Path | list | dict, *, execute_tool: str | None = None):
        self.plan = load_plan(plan)
        self.execute_tool = execute_tool

    def _results(self, messages: list[Message]) -> list[ToolOutcome]:
        out: list[ToolOutcome] = []
        for m in messages:
            if m.role == "tool":
                out.extend(m.results)
            elif m.role == "user" and m.outcome is not None:
                out.append(m.outcome)
        return out

    def _find_execute(self, tools: list[ToolSpec]) -> str | None:
        names = [t.name for t in tools]
        if self.execute_tool:
            return self.execute_tool
        if "sandbox_execute" in names:
            return "sandbox_execute"
        cands = [n for n in names if n.endswith("_execute")]
        return cands[0] if len(cands) == 1 else None

    async def complete(self, system: str, messages: list[Message], tools: list[ToolSpec], *,
                       tool_choice: str = "auto") -> ProviderResponse:
        outcomes = self._results(messages)
        # map executed outcomes back onto plan indices: every call/code step yields one outcome
        results: list[dict | None] = []
        k = 0
        idx = 0
        for i, step in enumerate(self.plan):
            if "answer" in step:
                if k >= len(outcomes):
                    idx = i
                    break
                results.append(None)
                continue
            if k < len(outcomes):
                results.append(step_view(outcomes[k]))
                k += 1
            else:
                idx = i
                break
        else:
            idx = len(self.plan)
        # a failed previous step stops the plan unless it allows errors
        if k > 0:
            prev_i = max(i for i, r in enumerate(results) if r is not None)
            prev = outcomes[k - 1]
            if prev.is_error and not self.plan[prev_i].get("allow_error"):
                raise PlanError(f"Plan step {prev_i} ({prev.name}) failed: {prev.text[:2000]}")
        usage = Usage(requests=1, cost_usd=0.0)
        if idx >= len(self.plan):
            return ProviderResponse(text="", usage=usage, stop_reason="end_turn", model=self.model)
        step = self.plan[idx]
        note = str(step.get("note", ""))
        if "answer" in step:
            ans = render(step["answer"], results)
            text = ans if isinstance(ans, str) else json.dumps(ans)
            return ProviderResponse(text=f"<answer>{text}</answer>", usage=usage, stop_reason="end_turn",
                                    model=self.model)
        if "call" in step:
            args = render(step.get("args", {}), results)
            if not tools:
                raise PlanError(f"Plan step {idx} calls {step['call']!r}, but this run is in code mode "
                                "(no tools). Run it with mode='tools' or write the step as code.")
            call = ToolCall(id=f"scripted_{idx}", name=render(step["call"], results), arguments=args)
            return ProviderResponse(text=note, tool_calls=[call], usage=usage, stop_reason="tool_use",
                                    model=self.model)
        code = render(step["code"], results)
        if not tools:  # code mode: a fenced code action
            return ProviderResponse(text=(note + "\n" if note else "") + f"```python\n{code}\n```", usage=usage,
                                    stop_reason="end_turn", model=self.model)
        exe = self._find_execute(tools)
        if exe is None:
            raise PlanError(f"Plan step {idx} is a code step, but no sandbox execute tool is connected. "
                            "Add the 'sandbox' server to the run.")
        args = {"code": code}
        if "timeout_s" in step:
            args["timeout_s"] = step["timeout_s"]
        return ProviderResponse(text=note, tool_calls=[ToolCall(id=f"scripted_{idx}", name=exe, arguments=args)],
                                usage=usage, stop_reason="tool_use", model=self.model)
