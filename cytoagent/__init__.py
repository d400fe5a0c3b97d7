"""cytoagent: MCP servers and an agent client for biomedical image and spatial-omics analysis."""

__version__ = "0.1.0"
