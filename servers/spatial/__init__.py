"""Spatial single-cell analysis library (no MCP): loaders, graphs, neighbourhood statistics, plots.

Every function takes plain AnnData objects / numpy arrays, so a code-writing agent can call e.g.
``servers.spatial.cooccurrence.co_occurrence(adata, "cell_type")`` directly; ``server.py`` wraps
the same functions as MCP tools. Coordinates live in ``adata.obsm['spatial']`` with their unit in
``adata.uns['spatial_units']`` (``'um'`` or ``'px'``) and, when known, ``adata.uns['mpp']``.
"""
