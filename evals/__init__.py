"""SlideQuest-style question benchmarks: schema, scorer, ground truth, generated data, runner.

Library first: :mod:`evals.schema` (the question format), :mod:`evals.scorer` (JSON answer
extraction, Hungarian row/key matching, tolerances), :mod:`evals.groundtruth` (reference answers
computed from annotations, label images and tables), :mod:`evals.generate` (datasets with exact
answers), :mod:`evals.runner` (runs questions through the agent client), :mod:`evals.cli`.
"""
