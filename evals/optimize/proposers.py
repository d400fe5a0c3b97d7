"""Proposers: where candidate ``preprocess_images`` functions come from.

- ``automl``: Optuna's TPE sampler over pipelines of 2–4 primitives from
  :mod:`servers.preprocess.primitives` (the paper's AutoML baseline), one study per rollout;
- ``random``: the same search space sampled uniformly (Optuna ``RandomSampler``);
- ``llm``: a model (any ``client.providers`` provider) writes ``preprocess_images_1..F`` per
  iteration from a prompt with the data/task description, the primitives, and — from
  ``bank_start`` on — the rollout's best and worst functions with their scores (paper §3).

Every proposer is resumable: :meth:`Proposer.observe` is fed every scored proposal of its rollout
(replayed from the bank after a restart) and :meth:`Proposer.propose` only fills missing slots.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

from servers.common.errors import ToolError

log = logging.getLogger("cytoagent.optimize")

PROPOSERS = ("automl", "random", "llm")
PIPELINE_HEADER = "Pipeline of preprocessing primitives found by search (servers/preprocess/primitives.py)."


@dataclass
class Proposal:
    slot: int
    code: str
    params: dict[str, Any] | None = None


class Proposer:
    """Interface: ``propose(iteration, slots, bank_view) -> [Proposal]``; ``observe(row)``."""

    name = "base"

    def propose(self, iteration: int, slots: list[int], bank_view: dict[str, Any]) -> list[Proposal]:
        raise NotImplementedError

    def observe(self, row: dict[str, Any]) -> None:
        """A scored proposal of this rollout (``bank.proposals`` row with ``score``/``status``)."""

    def close(self) -> None:
        pass


# -- AutoML / random ------------------------------------------------------------------------------
class OptunaProposer(Proposer):
    """Pipelines of ``min_steps``–``max_steps`` primitives sampled by an Optuna study.

    Trials asked in this process are told their score when it arrives; trials found in the bank
    (after a restart) are added with ``study.add_trial``, so the sampler sees the full history.
    """

    def __init__(self, *, sampler: str = "tpe", seed: int = 0, min_steps: int = 2, max_steps: int = 4,
                 primitives: list[str] | None = None):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if sampler == "tpe":
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=10)
        elif sampler == "random":
            s = optuna.samplers.RandomSampler(seed=seed)
        else:
            raise ToolError(f"Unknown sampler {sampler!r}.", hint="Use 'tpe' or 'random'.")
        self.name = "automl" if sampler == "tpe" else "random"
        self.study = optuna.create_study(direction="maximize", sampler=s)
        self.min_steps, self.max_steps = min_steps, max_steps
        self.primitives = primitives
        self._live: dict[tuple[int, int], Any] = {}
        self._seen: set[tuple[int, int]] = set()

    def propose(self, iteration: int, slots: list[int], bank_view: dict[str, Any]) -> list[Proposal]:
        from optuna.distributions import distribution_to_json

        from servers.preprocess.primitives import pipeline_code, suggest_pipeline

        out = []
        for slot in slots:
            trial = self.study.ask()
            steps = suggest_pipeline(trial, min_steps=self.min_steps, max_steps=self.max_steps,
                                     names=self.primitives)
            self._live[(iteration, slot)] = trial
            params = {"steps": steps, "optuna_params": trial.params,
                      "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()}}
            out.append(Proposal(slot, pipeline_code(steps, header=PIPELINE_HEADER), params))
        return out

    def observe(self, row: dict[str, Any]) -> None:
        import optuna
        from optuna.distributions import json_to_distribution

        key = (row["iteration"], row["slot"])
        if key in self._seen or row.get("score") is None:
            return
        self._seen.add(key)
        value = float(row["score"])
        trial = self._live.pop(key, None)
        if trial is not None:
            self.study.tell(trial, value)
            return
        p = row.get("params") or {}
        if "optuna_params" not in p:
            return
        dists = {k: json_to_distribution(v) for k, v in p["distributions"].items()}
        self.study.add_trial(optuna.trial.create_trial(params=p["optuna_params"], distributions=dists, value=value))


# -- LLM ------------------------------------------------------------------------------------------
SYSTEM_PROMPT = """You are an experienced Python developer specialising in scientific image analysis. You write \
image preprocessing functions that improve the output of a fixed downstream analysis tool. You reply with \
exactly one ```python code block holding only the requested functions (imports allowed at the top)."""

PROMPT_TEMPLATE = """## Preprocessing function API
Each function takes a list of images (numpy arrays) and returns a list with one processed image per input, \
in the same order, with the same height and width and the same channel layout. `numpy as np` and \
`cv2` (OpenCV) are available. The code runs in a stateless sandbox with {timeout_s:g} s per function for \
all images.

```python
import numpy as np
import cv2

{signature_i}
    out = []
    for img in images:
        x = np.asarray(img, dtype=np.float32)   # work on a copy
        # ... your processing ...
        out.append(x)
    return out
```

## About the dataset
{data}

## Task
{task}

Write {n} new, different preprocessing functions named {names}. Successful strategies include improving \
on high-scoring functions (including tuning their parameters) and exploring new image-processing \
approaches; combine OpenCV functions freely. Start simple and build up. Do not write code outside the \
functions (imports excepted); no mock data, no evaluation code.

## Building blocks (reference implementations you may copy or re-implement with OpenCV)
{primitives}

## Function bank
{bank}

This is iteration {iteration} of {iterations}."""


def build_prompt(describe: dict[str, Any], *, n: int, iteration: int, iterations: int,
                 bank_view: dict[str, Any] | None, use_bank: bool, bank_start: int, timeout_s: float = 60.0) -> str:
    """The coding prompt (paper App. A.11 structure) from a ``describe_task`` result and bank samples."""
    names = ", ".join(f"`preprocess_images_{i}`" for i in range(1, n + 1))
    prims = "\n".join(f"- `{p['signature']}`: {p['doc']}" + (f" Ranges: {'; '.join(p['params'])}." if p["params"] else "")
                      for p in describe.get("primitives", []))
    if not use_bank:
        bank = "(not used in this run)"
    elif iteration < bank_start:
        bank = f"Function bank history will be shown from iteration {bank_start}; this is iteration {iteration}."
    else:
        parts = []
        for title, rows in (("Best functions so far", (bank_view or {}).get("top", [])),
                            ("Worst functions so far", (bank_view or {}).get("bottom", []))):
            if not rows:
                continue
            parts.append(f"### {title}")
            for r in rows:
                parts.append(f"Score ({describe.get('metric')}) = {r['score']:.4f}\n```python\n{r['code'].strip()}\n```")
        fails = (bank_view or {}).get("failures", [])
        if fails:
            parts.append("### Recent failures (fix these mistakes)")
            parts += [f"- {f['error'][:300]}" for f in fails]
        bank = "\n".join(parts) or "(empty so far)"
    sig = "def preprocess_images_i(images: list[np.ndarray]) -> list[np.ndarray]:"
    return PROMPT_TEMPLATE.format(timeout_s=timeout_s, signature_i=sig, data=describe.get("data_description", ""),
                                  task=describe.get("task_description", ""), n=n, names=names, primitives=prims,
                                  bank=bank, iteration=iteration, iterations=iterations)


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def extract_functions(text: str, n: int | None = None) -> dict[int, str]:
    """``{i: standalone code defining preprocess_images}`` for each ``preprocess_images_i`` in the reply.

    Imports and helper definitions at module level are kept with every function; each function is
    renamed to ``preprocess_images``. A reply without code blocks is parsed as bare code.
    """
    blocks = _FENCE.findall(text) or [text]
    out: dict[int, str] = {}
    for block in blocks:
        src = textwrap.dedent(block)
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        shared, funcs = [], {}
        for node in tree.body:
            m = re.fullmatch(r"preprocess_images(?:_(\d+))?", getattr(node, "name", "") or "")
            if isinstance(node, ast.FunctionDef) and m:
                funcs[int(m.group(1) or 1)] = node
            elif isinstance(node, ast.Import | ast.ImportFrom | ast.FunctionDef | ast.Assign | ast.ClassDef):
                shared.append(node)
        for i, fn in funcs.items():
            fn.name = "preprocess_images"
            mod = ast.Module(body=[*shared, fn], type_ignores=[])
            out[i] = ast.unparse(mod) + "\n"
    if n is not None:
        out = {i: c for i, c in out.items() if 1 <= i <= n}
    return out


@dataclass
class LLMProposer(Proposer):
    """Asks a ``client.providers`` provider for ``len(slots)`` functions per iteration.

    ``describe`` is the preprocess server's ``describe_task`` result (fetched over MCP by
    :func:`describe_via_mcp`); ``bank_view`` (top/bottom functions of this rollout) comes from the loop.
    Slots the reply does not fill get a stub that fails with a clear message (a scored failure).
    """

    provider: Any = None
    describe: dict[str, Any] = field(default_factory=dict)
    iterations: int = 20
    use_bank: bool = True
    bank_start: int = 5
    timeout_s: float = 60.0
    name: str = "llm"
    transcript: list[dict[str, Any]] = field(default_factory=list)

    def propose(self, iteration: int, slots: list[int], bank_view: dict[str, Any]) -> list[Proposal]:
        from client.providers.base import Message

        prompt = build_prompt(self.describe, n=len(slots), iteration=iteration, iterations=self.iterations,
                              bank_view=bank_view, use_bank=self.use_bank, bank_start=self.bank_start,
                              timeout_s=self.timeout_s)
        try:
            resp = _run_async(self.provider.complete(SYSTEM_PROMPT, [Message("user", prompt)], []))
            text = resp.text or ""
        except Exception as e:  # noqa: BLE001 - a failed model call becomes failed proposals, not a crash
            log.warning("LLM proposer: provider call failed: %s", e)
            text = ""
            err = f"{type(e).__name__}: {e}"
        else:
            err = None
        self.transcript.append({"iteration": iteration, "prompt": prompt, "reply": text, "error": err})
        funcs = extract_functions(text, n=len(slots))
        out = []
        for j, slot in enumerate(slots, start=1):
            code = funcs.get(j)
            if code is None:
                why = err or f"the model's reply had no preprocess_images_{j}"
                code = (f"# no function: {why}\n"
                        f"raise RuntimeError({('The proposer produced no function: ' + why)[:300]!r})\n")
            out.append(Proposal(slot, code, {"iteration": iteration, "j": j}))
        return out


def _run_async(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


def describe_via_mcp(task: str, server: Any = None) -> dict[str, Any]:
    """``describe_task`` of the preprocess server, called over MCP (in-memory client by default)."""

    async def go():
        from fastmcp import Client

        srv = server
        if srv is None:
            from servers.preprocess.server import mcp as srv
        async with Client(srv) as c:
            r = await c.call_tool("describe_task", {"task": task, "bank_k": 0})
            return r.structured_content or json.loads(r.content[0].text)

    return _run_async(go())


def make_proposer(name: str, *, seed: int = 0, rollout: int = 0, min_steps: int = 2, max_steps: int = 4,
                  provider: Any = None, describe: dict[str, Any] | None = None, iterations: int = 20,
                  use_bank: bool = True, bank_start: int = 5, timeout_s: float = 60.0) -> Proposer:
    if name == "automl":
        return OptunaProposer(sampler="tpe", seed=seed * 1000 + rollout, min_steps=min_steps, max_steps=max_steps)
    if name == "random":
        return OptunaProposer(sampler="random", seed=seed * 1000 + rollout, min_steps=min_steps, max_steps=max_steps)
    if name == "llm":
        if provider is None:
            raise ToolError("The llm proposer needs a provider.",
                            hint="Pass --provider anthropic|openai|openai-compatible (and --model).")
        return LLMProposer(provider=provider, describe=describe or {}, iterations=iterations, use_bank=use_bank,
                           bank_start=bank_start, timeout_s=timeout_s)
    raise ToolError(f"Unknown proposer {name!r}.", hint=f"Use one of: {', '.join(PROPOSERS)}.")
