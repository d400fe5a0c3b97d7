"""cytoagent's bundled agent client: connect to MCP servers over stdio, let a model (or a scripted
plan) chain their tools or write code for the sandbox, and leave a transcript and a report.

Python API::

    from client.agent import run_agent_sync
    from client.providers import get_provider

    res = run_agent_sync("How many cells are in ...?", get_provider("scripted", plan=[...]),
                         servers=["spatial", "sandbox"], mode="tools", out_dir="runs/q1")
    res.answer, res.transcript_path, res.report_path, res.usage
"""
