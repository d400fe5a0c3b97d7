"""Preprocessing optimisation: tasks, primitives, downstream tools, sandboxed evaluation, function bank."""
