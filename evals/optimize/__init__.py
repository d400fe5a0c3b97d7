"""The agentic-superoptimisation loop for preprocessing functions (``cytoagent optimize TASK``).

Library first: :mod:`evals.optimize.proposers` (``automl`` = Optuna TPE over 2–4 primitive
pipelines, ``random``, ``llm`` through the client's providers with prompts built from the preprocess
server's ``describe_task`` over MCP), :mod:`evals.optimize.loop` (rollouts × iterations × functions per
iteration, parallel evaluation through the executor, SQLite bank, SIGKILL-resumable, top-K test
evaluation), :mod:`evals.optimize.report` (JSON report, best functions as files, learning curves),
:mod:`evals.optimize.cli`.
"""
