"""cytoagent MCP servers. Every subfolder with a ``server.py`` defining a FastMCP server is a server."""
