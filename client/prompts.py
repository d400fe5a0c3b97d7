"""System prompts for the two agent modes and the final-answer instructions.

Code mode follows CodeCytos: a minimal system prompt plus a few short, domain-agnostic coding
examples (no spatial-analysis instructions), so the model reasons in code against the data.
"""

from __future__ import annotations

ANSWER_RULES = (
    "When you are done, reply with the final answer inside <answer></answer> tags. "
    "If the question asks for JSON, put only valid JSON inside the tags (no comments, no code fences)."
)

TOOLS_SYSTEM = """You analyse biomedical images and spatial omics data with the tools provided.
- File paths you pass to tools are relative to the data root: {data_root}
- Tools save large results (images, masks, tables, datasets) as workspace artifacts and return their ids; pass those ids to later tools. Workspace: {workspace}
- Chain tools step by step, check intermediate results, and keep units explicit (px vs µm).
- If a tool returns an error, read it: it says what was wrong and what to pass instead.
{answer_rules}"""

CODE_SYSTEM = """You solve tasks by writing Python code.
Each reply is either ONE ```python code block, or the final answer.
The code runs in a persistent Python session: variables and imports survive between replies. After each block you see its stdout, the value of its last expression, any error traceback, and any matplotlib figures.
- Data (read-only) is under: {data_root}
- Write any output files under: {workspace}
- Installed: numpy, pandas, scipy, scikit-image, scikit-learn, matplotlib, anndata, scanpy, squidpy, tifffile, openslide; this project's library is importable (`servers.spatial`, `servers.wsi`, `servers.common`, ...).
Look at the data before computing; print only what you need.
{answer_rules}

Examples (from other domains):

Task: Which word occurs most often in notes/a.txt?
```python
from collections import Counter
words = open(DATA + "/notes/a.txt").read().lower().split()
Counter(words).most_common(3)
```
Observation: value = [('the', 41), ('river', 12), ('and', 11)]
<answer>the</answer>

Task: Mean price per category in shop/items.csv, as JSON.
```python
import pandas as pd
df = pd.read_csv(DATA + "/shop/items.csv")
df.columns.tolist(), df.head(3)
```
Observation: value = (['item', 'cat', 'price_eur'], ...)
```python
df.groupby("cat")["price_eur"].mean().round(2).to_dict()
```
Observation: value = {{'food': 3.1, 'tools': 12.75}}
<answer>{{"food": 3.1, "tools": 12.75}}</answer>

Task: How many days between 2021-03-01 and 2021-07-15?
```python
from datetime import date
(date(2021, 7, 15) - date(2021, 3, 1)).days
```
Observation: error NameError ... (fix it and run again if that happens)
Observation: value = 136
<answer>136</answer>

In your code, DATA is already set to the data root and WORKSPACE to the workspace."""

JSON_REMINDER = ("Your final answer must be valid JSON inside <answer></answer> tags, as the question asks. "
                 "Reply with only the corrected <answer>…</answer>.")

WRAP_UP = ("The step limit is reached. Do not call tools or write code any more: give your best final answer "
           "now from what you have, inside <answer></answer> tags.")

NO_CODE = ("Reply with ONE ```python code block to run, or with the final answer inside <answer></answer> "
           "tags.")


LLM_SYSTEM = """You answer questions about biomedical images and spatial omics data. You have no tools and
cannot read the data: answer from the question and your knowledge, and give your best estimate
when you cannot be sure.
{answer_rules}"""


def system_prompt(mode: str, *, data_root: str, workspace: str, json_answer: bool = False) -> str:
    rules = ANSWER_RULES + (" This question asks for JSON." if json_answer else "")
    template = {"code": CODE_SYSTEM, "llm": LLM_SYSTEM}.get(mode, TOOLS_SYSTEM)
    return template.format(data_root=data_root, workspace=workspace, answer_rules=rules)


def code_preamble(data_root: str, workspace: str) -> str:
    """Run once at the start of a code-mode session: the names the system prompt promises."""
    return f"DATA = {data_root!r}\nWORKSPACE = {workspace!r}\n"
