"""Spatial single-cell analysis: load CosMx/Xenium/MERFISH/tables, cell types, neighbourhoods, spatial statistics, plots.

Thin MCP layer over ``servers.spatial.*``. A dataset is an AnnData artifact in the workspace; the id
returned by ``load_dataset`` is what every other tool takes as ``dataset``. Tools that add
information (graph, phenotypes, clusters, niches, distances) save a *new* dataset artifact and
return its id, so earlier results stay reproducible.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastmcp import Context
from fastmcp.tools import ToolResult
from pydantic import Field

from cytoagent.mcpkit import create_server, run_blocking, tool_result

mcp = create_server(
    "spatial",
    "Spatial single-cell analysis (CosMx, MERFISH, Xenium, multiplexed imaging). Start with load_dataset "
    "(a data-root path) to get a dataset id, then dataset_summary; build a spatial_graph before "
    "neighborhood_enrichment / spatial_autocorrelation (they build a 6-NN graph if none exists). "
    "Distances are in the dataset's coordinate unit (stated in every result); densities per mm².",
)

Dataset = Annotated[str, Field(description="Dataset artifact id from load_dataset (or a workspace/data .h5ad path).")]
CellTypeKey = Annotated[str, Field(description="obs column with cell types/clusters, e.g. 'cell_type' or 'phenotype'.")]


def _table(df, name: str, tool: str, args: dict) -> dict[str, Any]:
    """Inline the first rows; store the whole table as an artifact when it is longer."""
    from servers.common.config import get_config
    from servers.common.workspace import get_workspace

    lim = get_config().limits.max_table_rows_inline
    out: dict[str, Any] = {"n_rows": int(len(df)), "rows": df.head(lim).round(6).to_dict("records")}
    if len(df) > lim:
        art = get_workspace().save_table(df.reset_index(drop=True), name=name,
                                         provenance={"tool": tool, "args": args})
        out["table_artifact"] = art.id
        out["note"] = f"first {lim} of {len(df)} rows shown; full table in artifact {art.id}"
    return out


def _units(adata) -> str | None:
    u = adata.uns.get("spatial_units")
    return None if u is None else str(u)


def _ensure_graph(adata, method: str, n_neighbors: int, radius: float | None) -> dict | None:
    from servers.spatial.graph import CONN_KEY, spatial_graph

    if CONN_KEY in adata.obsp:
        return None
    return spatial_graph(adata, method=method, n_neighbors=n_neighbors, radius=radius).to_dict()


# -- loading / summary -----------------------------------------------------------------------------


@mcp.tool(annotations={"readOnlyHint": False})
def load_dataset(
    path: Annotated[str, Field(description="Path relative to the data root: .h5ad, .csv/.tsv/.parquet cell table, "
                                           "or a CosMx / Xenium / MERFISH output folder.")],
    format: Literal["auto", "h5ad", "table", "cosmx", "xenium", "merfish"] = "auto",
    units: Literal["um", "px"] | None = None,
    mpp: float | None = None,
    x_col: str | None = None,
    y_col: str | None = None,
    cell_type_col: str | None = None,
    sample_col: str | None = None,
    id_col: str | None = None,
    marker_cols: list[str] | None = None,
    drop_nan_coords: bool | None = None,
) -> ToolResult:
    """Load spatial single-cell data into the workspace as a dataset (AnnData) and return its id.

    Tables and .h5ad files need the coordinate unit stated (units='um' or 'px', plus mpp = µm per
    pixel for pixels); CosMx (µm via mpp 0.12028), Xenium and MERFISH (µm) state it themselves.
    CosMx: cells × genes counts from the transcript file (cell_ID 0 = outside cells, negative probes
    kept apart), cell areas and centroids from CellLabels images, global coordinates from FOV
    positions.

    Args:
        path: Data-root-relative file or folder.
        format: Reader; 'auto' detects it from the file name / folder contents.
        units: Unit of x/y for tables and .h5ad files without uns['spatial_units'].
        mpp: Microns per pixel (pixels) — CosMx default 0.12028.
        x_col: Column with x (tables; obs column for .h5ad without obsm['spatial']).
        y_col: Column with y.
        cell_type_col: Column with cell types (copied to obs['cell_type']).
        sample_col: Column with sample / FOV / image ids (copied to obs['sample']).
        id_col: Column with cell ids (tables).
        marker_cols: Marker/gene columns forming X (tables; default: all other numeric columns).
        drop_nan_coords: Drop cells with missing coordinates instead of refusing the table.

    Returns:
        dataset id, cells, genes/markers, unit, coordinate extent and obs columns.
    """
    from servers.spatial.core import save_dataset
    from servers.spatial.gating import summarize
    from servers.spatial.io import load_path

    opts = {"units": units, "mpp": mpp, "x_col": x_col, "y_col": y_col, "cell_type_col": cell_type_col,
            "sample_col": sample_col, "id_col": id_col, "marker_cols": marker_cols,
            "drop_nan_coords": drop_nan_coords}
    adata = load_path(path, fmt=format, **opts)
    art = save_dataset(adata, name=str(path).rstrip("/").split("/")[-1], tool="load_dataset",
                       args={"path": path, "format": format, **{k: v for k, v in opts.items() if v is not None}})
    s = summarize(adata)
    extra = {k: adata.uns[k] for k in ("cosmx", "xenium", "merfish") if k in adata.uns}
    return tool_result({"dataset": art.id, **s, **extra})


@mcp.tool(annotations={"readOnlyHint": True})
def dataset_summary(dataset: Dataset) -> dict:
    """Summary of a dataset: cells, genes/markers, coordinate unit and extent, obs columns (categories with
    counts, numeric ranges), stored graphs/embeddings. Use it to find the cell-type column name."""
    from servers.spatial.core import load_dataset as _load
    from servers.spatial.gating import summarize

    return {"dataset": dataset, **summarize(_load(dataset))}


@mcp.tool(annotations={"readOnlyHint": True})
def composition(dataset: Dataset, cluster_key: CellTypeKey,
                by: Annotated[str | None, Field(description="Optional obs column to split by (sample, FOV, niche).")] = None
                ) -> dict:
    """Cell-type counts and fractions, overall or per group (sample / FOV / region / niche)."""
    from servers.spatial import gating
    from servers.spatial.core import load_dataset as _load

    df = gating.composition(_load(dataset), cluster_key, by)
    return {"dataset": dataset, "cluster_key": cluster_key, "by": by,
            **_table(df, "composition", "composition", {"dataset": dataset, "cluster_key": cluster_key, "by": by})}


@mcp.tool(annotations={"readOnlyHint": True})
def group_statistics(
    dataset: Dataset,
    group_key: Annotated[str, Field(description="obs column defining the groups (cell type, phenotype, FOV, niche).")],
    columns: Annotated[list[str], Field(description="Numeric obs columns (e.g. 'Area', 'area_um2') and/or "
                                                    "gene/marker names (values from X) to summarise.")],
    stats: Annotated[list[Literal["mean", "median", "std", "min", "max", "sum", "count"]],
                     Field(description="Statistics per column; std is the sample std (ddof=1).")] = ["mean", "median", "std", "count"],  # noqa: B006
    sort: Literal["size", "name"] = "size",
    top: Annotated[int | None, Field(description="Keep only the first `top` groups after sorting "
                                                 "(sort='size', top=3: the three most frequent groups).", ge=1)] = None,
    layer: Annotated[str | None, Field(description="Layer for marker values instead of X.")] = None,
) -> dict:
    """Per-group summary statistics of cell measurements: e.g. mean cell area per phenotype, or mean
    marker/gene expression per cell type. One row per group: the group name (under group_key),
    n_cells, fraction of all cells, and '<column>_<stat>' (e.g. 'Area_mean', 'CD8A_median'). Units
    are those of the column (obs 'Area' in the source's units; area_um2 in µm²; X as loaded)."""
    from servers.spatial.core import load_dataset as _load
    from servers.spatial.groupstats import group_statistics as run

    df = run(_load(dataset), group_key, columns, stats, layer=layer, sort=sort, top=top)
    args = {"dataset": dataset, "group_key": group_key, "columns": columns, "stats": stats, "top": top}
    return {"dataset": dataset, "group_key": group_key, **_table(df, "group_statistics", "group_statistics", args)}


@mcp.tool(annotations={"readOnlyHint": False})
def transcript_counts(
    path: Annotated[str, Field(description="CosMx / Xenium / MERFISH output folder, relative to the data root "
                                           "(the folder with *_tx_file.csv, transcripts.parquet/.csv.gz or "
                                           "detected_transcripts.csv).")],
    by: Annotated[list[Literal["fov", "gene", "cell"]], Field(description="Group keys in order; [] for one "
                                                                         "overall row.")] = ["fov"],  # noqa: B006
    genes: Annotated[list[str] | None, Field(description="Count only these genes (CosMx 'target').")] = None,
    fovs: Annotated[list[int | str] | None, Field(description="Count only these FOVs.")] = None,
    include_controls: Annotated[bool, Field(description="Count negative-control / blank probes too. True counts "
                                                        "every row of the transcript table.")] = True,
    in_cells_only: Annotated[bool, Field(description="Count only transcripts assigned to a cell "
                                                     "(CosMx cell_ID > 0).")] = False,
    top_k: Annotated[int | None, Field(description="Keep the k largest groups within each group of the other "
                                                   "keys (by=['gene'], fovs=[2], top_k=5: top genes of FOV 2).",
                                       ge=1)] = None,
    format: Literal["auto", "cosmx", "xenium", "merfish"] = "auto",
    min_qv: Annotated[float | None, Field(description="Xenium: drop transcripts with qv below this.")] = 20.0,
) -> dict:
    """Transcript statistics straight from a run's per-transcript table (no dataset needed): counts
    grouped by FOV, gene and/or cell. Each row (unless grouped by cell) has n_transcripts,
    n_in_cells, fraction_in_cells (0-1, assigned to a cell), n_cells (cells with >= 1 of these
    transcripts) and mean_transcripts_per_cell (in-cell transcripts / n_cells). Grouped by cell:
    n_transcripts and n_genes per cell (in-cell transcripts only). Examples: transcripts per FOV
    (by=['fov']); top genes of a FOV (by=['gene'], fovs=[2], top_k=5); one gene per FOV
    (by=['fov'], genes=['COL1A1']). The full table is saved as an artifact (table_artifact)."""
    from servers.common.paths import resolve_data_path
    from servers.common.workspace import get_workspace
    from servers.spatial.io import read_transcripts
    from servers.spatial.transcripts import transcript_counts as run

    tx, info = read_transcripts(resolve_data_path(path), format, min_qv=min_qv)
    df = run(tx, by, genes=genes, fovs=fovs, include_controls=include_controls, in_cells_only=in_cells_only,
             top_k=top_k)
    args = {"path": path, "by": by, "genes": genes, "fovs": fovs, "include_controls": include_controls,
            "in_cells_only": in_cells_only, "top_k": top_k, "format": format, "min_qv": min_qv}
    out = _table(df, "transcript_counts", "transcript_counts", args)
    if "table_artifact" not in out:
        out["table_artifact"] = get_workspace().save_table(df, name="transcript_counts",
                                                           provenance={"tool": "transcript_counts", "args": args}).id
    n_ctrl = int(tx["is_control"].sum())
    return {"path": path, "format": info["format"], "file": info["file"], "by": by,
            "n_transcripts_total": int(len(tx)), "n_control_transcripts_total": n_ctrl,
            "n_dropped_low_qv": info["n_dropped_low_qv"], "include_controls": include_controls,
            "in_cells_only": in_cells_only, **out}


@mcp.tool
def gate_phenotypes(
    dataset: Dataset,
    rules: Annotated[list[dict], Field(description='Ordered gating rules, first match wins: [{"name": "CD8 T", '
                                                    '"positive": ["CD3D", "CD8A"], "negative": ["CD4"]}, ...].')],
    thresholds: Annotated[dict[str, float] | None, Field(description="Marker → positivity threshold (in X's values). "
                                                                     "Missing markers get an automatic one.")] = None,
    method: Literal["otsu", "median"] = "otsu",
    key_added: str = "phenotype",
) -> dict:
    """Phenotype cells by marker gating (multiplexed imaging / protein panels). A cell gets the first rule
    whose positive markers are all above and negative markers all at/below their thresholds; others are
    'Unknown'. Saves a new dataset with obs[key_added] and returns counts per phenotype and thresholds."""
    from servers.spatial import gating
    from servers.spatial.core import load_dataset as _load
    from servers.spatial.core import save_dataset

    adata = _load(dataset)
    df = gating.gate(adata, rules, thresholds, method=method, key_added=key_added)
    args = {"dataset": dataset, "rules": rules, "thresholds": thresholds, "method": method}
    art = save_dataset(adata, name=f"gated_{key_added}", tool="gate_phenotypes", args=args)
    return {"dataset": art.id, "key": key_added, "thresholds": adata.uns["gating"]["thresholds"],
            "phenotypes": df.round(4).to_dict("records")}


@mcp.tool
async def cluster_cells(
    dataset: Dataset, ctx: Context,
    normalization: Literal["log1p", "arcsinh", "zscore", "none"] = "log1p",
    n_pcs: int = 20, method: Literal["kmeans", "leiden"] = "kmeans", n_clusters: int = 8,
    key_added: str = "cluster", seed: int = 0,
    resolution: Annotated[float, Field(description="Leiden only: higher gives more, smaller clusters.", gt=0)] = 1.0,
    n_neighbors: Annotated[int, Field(description="Leiden only: neighbours in the expression kNN graph.", ge=2)] = 15,
) -> dict:
    """Normalise (log1p of counts scaled to 10k for transcripts; arcsinh/zscore for intensities), PCA, then
    cluster cells: k-means into n_clusters (default), or Leiden community detection on a kNN graph of the
    PCs (scanpy; cluster count set by resolution, n_clusters ignored). Saves a new dataset with
    obs[key_added], obsm['X_pca']; returns cluster sizes and the top markers per cluster (highest mean
    normalised expression)."""
    from servers.spatial.core import load_dataset as _load

    def work():
        import numpy as np

        from servers.spatial import gating
        from servers.spatial.core import save_dataset

        adata = _load(dataset)
        if normalization != "none":
            gating.normalize(adata, normalization)
        var = gating.pca(adata, n_pcs, seed=seed)
        sizes = gating.cluster(adata, n_clusters=n_clusters, method=method, key_added=key_added, seed=seed,
                               resolution=resolution, n_neighbors=n_neighbors)
        X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
        lab = adata.obs[key_added].to_numpy()
        top = {}
        for c in adata.obs[key_added].cat.categories:
            m = X[lab == c].mean(axis=0) - X.mean(axis=0)
            top[str(c)] = [str(adata.var_names[i]) for i in np.argsort(-m)[:5]]
        art = save_dataset(adata, name=f"clustered_{key_added}", tool="cluster_cells",
                           args={"dataset": dataset, "normalization": normalization, "n_pcs": n_pcs,
                                 "method": method, "n_clusters": n_clusters, "seed": seed,
                                 **({"resolution": resolution, "n_neighbors": n_neighbors} if method == "leiden" else {})})
        return {"dataset": art.id, "key": key_added, "pca_variance_ratio": [round(float(v), 4) for v in var[:10]],
                "clusters": sizes.to_dict("records"), "top_markers": top}

    return await run_blocking(ctx, work)


# -- graph and neighbourhood statistics ----------------------------------------------------------


@mcp.tool
def spatial_graph(
    dataset: Dataset,
    method: Literal["knn", "radius", "delaunay"] = "knn",
    n_neighbors: Annotated[int, Field(description="k nearest neighbours per cell (method='knn').")] = 6,
    radius: Annotated[float | None, Field(description="Radius for 'radius'; max edge length for knn/delaunay "
                                                      "(coordinate units).")] = None,
) -> dict:
    """Build a spatial neighbour graph (same definitions as squidpy.gr.spatial_neighbors: kNN directed,
    radius/Delaunay symmetric) and save a new dataset holding it (obsp['spatial_connectivities'])."""
    from servers.spatial.core import load_dataset as _load
    from servers.spatial.core import save_dataset
    from servers.spatial.graph import spatial_graph as build

    adata = _load(dataset)
    info = build(adata, method=method, n_neighbors=n_neighbors, radius=radius)
    art = save_dataset(adata, name=f"graph_{method}", tool="spatial_graph",
                       args={"dataset": dataset, "method": method, "n_neighbors": n_neighbors, "radius": radius})
    return {"dataset": art.id, **info.to_dict()}


@mcp.tool
async def neighborhood_enrichment(
    dataset: Dataset, cluster_key: CellTypeKey, ctx: Context,
    n_perms: int = 1000, seed: int = 0,
    library_key: Annotated[str | None, Field(description="Permute labels within each sample/FOV of this obs column.")] = None,
    graph_method: Literal["knn", "radius", "delaunay"] = "knn",
    n_neighbors: Annotated[int, Field(description="k for a kNN graph built here (if the dataset has none).")] = 6,
    radius: Annotated[float | None, Field(description="Radius (coordinate units) for graph_method='radius'.")] = None,
    permutations: Literal["fast", "squidpy", "analytic"] = "fast",
) -> ToolResult:
    """Neighbourhood enrichment z-scores between cell types (squidpy.gr.nhood_enrichment definition):
    edge counts by type pair on the spatial graph versus n_perms label permutations. z > 0: the types are
    neighbours more often than chance (e.g. self-enrichment of a compartment); z < 0: they avoid each
    other. Uses the dataset's graph, or builds one with graph_method if it has none. permutations:
    'fast' (default), 'squidpy' (squidpy's exact permutation sequence for the seed) or 'analytic'
    (exact permutation mean/variance, no sampling — instant on millions of cells). Returns top
    enriched/depleted pairs, self_enrichment (z of each type with itself), self_enrichment_call
    ('enriched' z >= 1.96, 'depleted' z <= -1.96, else 'not significant'), the full table as an
    artifact, and a heatmap."""
    from servers.spatial.core import load_dataset as _load

    def work(progress=None):
        from servers.spatial import plots
        from servers.spatial.enrichment import nhood_enrichment

        adata = _load(dataset)
        built = _ensure_graph(adata, graph_method, n_neighbors, radius)
        res = nhood_enrichment(adata, cluster_key, n_perms=n_perms, seed=seed, library_key=library_key,
                               permutations=permutations, progress=progress)
        png = plots.heatmap(res.zscore, res.categories)
        return res, built, png

    res, built, png = await run_blocking(ctx, work)
    args = {"dataset": dataset, "cluster_key": cluster_key, "n_perms": n_perms, "seed": seed}
    from servers.common.workspace import get_workspace

    art = get_workspace().save_table(res.table(), name="nhood_enrichment", provenance={"tool": "neighborhood_enrichment",
                                                                                       "args": args})
    out = {"dataset": dataset, "table_artifact": art.id, **res.summary()}
    if built:
        out["graph_built"] = built
    return tool_result(out, images=[png])


@mcp.tool
async def co_occurrence(
    dataset: Dataset, cluster_key: CellTypeKey, ctx: Context,
    n_intervals: int = 50,
    distances: Annotated[list[float] | None, Field(description="Explicit ascending distances (coordinate units); "
                                                               "the first is only the start, ratios are given at "
                                                               "the others. Default: squidpy's automatic range.")] = None,
    reference_type: Annotated[str | None, Field(description="Cell type whose curves are plotted.")] = None,
) -> ToolResult:
    """Co-occurrence ratio over distance (squidpy.gr.co_occurrence definition, identical numbers):
    p(type i within d of a type-c cell) / p(type i within d). > 1 means i is found near c more often
    than overall. Returns per-type summaries at the first distance, the full (k, k, L) array as an
    artifact, and curves for reference_type (default: the most common type)."""
    from servers.spatial.core import load_dataset as _load

    def work(progress=None):
        import numpy as np

        from servers.spatial import plots
        from servers.spatial.cooccurrence import co_occurrence as run

        adata = _load(dataset)
        res = run(adata, cluster_key, interval=distances if distances is not None else int(n_intervals),
                  progress=progress)
        ref = reference_type
        if ref is None:
            ref = res.categories[int(np.argmax(res.counts[:, :, -1].sum(axis=1)))]
        png = plots.cooccurrence_curves(res.occ, res.interval, res.categories, ref, units=_units(adata))
        return res, ref, png, _units(adata)

    res, ref, png, units = await run_blocking(ctx, work)
    from servers.common.workspace import get_workspace

    art = get_workspace().save_json({"categories": res.categories, "interval": res.interval.tolist(),
                                     "occ": res.occ.tolist(), "occ_index": "occ[i][c][r]: type i given type c at "
                                                                           "interval[r + 1]"},
                                    name="co_occurrence", provenance={"tool": "co_occurrence",
                                                                      "args": {"dataset": dataset,
                                                                               "cluster_key": cluster_key}})
    return tool_result({"dataset": dataset, "units": units, "reference_type": ref, "artifact": art.id,
                        **res.summary()}, images=[png])


@mcp.tool
async def ripley(
    dataset: Dataset, ctx: Context,
    mode: Annotated[Literal["K", "L", "G"], Field(description="K (pairs within r), L (variance-stabilised K, "
                                                              "L(r) - r), or G (nearest-neighbour CDF).")] = "L",
    cluster_key: Annotated[str | None, Field(description="obs column with cell types (with cell_type).")] = None,
    cell_type: Annotated[str | None, Field(description="Only cells of this type (needs cluster_key); "
                                                       "default: all cells.")] = None,
    max_radius: Annotated[float | None, Field(description="Largest radius, in the dataset's coordinate units "
                                                          "(µm or px, see 'units'); default: automatic.", gt=0)] = None,
    n_radii: Annotated[int, Field(description="Number of radii from 0 to max_radius.", ge=2, le=1000)] = 50,
    n_simulations: Annotated[int, Field(description="Random patterns for the CSR envelope.", ge=0, le=2000)] = 100,
    seed: int = 0,
) -> ToolResult:
    """Ripley's K, L (reported as L(r) - r, 0 under randomness) or G (nearest-neighbour CDF) for all cells
    or one cell type, with a complete-spatial-randomness envelope from n_simulations uniform patterns in
    the same window. Observed above the envelope → clustered; below → dispersed/regular."""
    from servers.spatial.core import load_dataset as _load

    def work():
        import numpy as np

        from servers.spatial import plots, stats

        adata = _load(dataset)
        radii = None if max_radius is None else np.linspace(0, float(max_radius), int(n_radii))
        r = stats.ripley(adata, mode=mode, cluster_key=cluster_key, cell_type=cell_type, radii=radii,
                         n_simulations=n_simulations, seed=seed)
        png = plots.ripley_curve(r.radii, r.observed, r.envelope_low, r.envelope_high, r.mode, _units(adata))
        return r, png

    r, png = await run_blocking(ctx, work)
    return tool_result({"dataset": dataset, **r.summary()}, images=[png])


@mcp.tool
async def spatial_autocorrelation(
    dataset: Dataset, ctx: Context,
    genes: Annotated[list[str] | None, Field(description="Genes/markers (default: all).")] = None,
    mode: Literal["moran", "geary"] = "moran",
    graph_method: Literal["knn", "radius", "delaunay"] = "knn",
    n_neighbors: Annotated[int, Field(description="k for a kNN graph built here (if the dataset has none).")] = 6,
    radius: Annotated[float | None, Field(description="Radius (coordinate units) for graph_method='radius'.")] = None,
) -> dict:
    """Moran's I (or Geary's C) of genes/markers on the spatial graph, row-normalised weights, analytic
    p-values (squidpy.gr.spatial_autocorr, pval_norm). I near 1 / C near 0: spatially patterned; I near 0
    / C near 1: random. Builds a graph if the dataset has none."""
    from servers.spatial.core import load_dataset as _load

    def work():
        from servers.spatial import stats

        adata = _load(dataset)
        built = _ensure_graph(adata, graph_method, n_neighbors, radius)
        return stats.autocorrelation(adata, genes, mode=mode), built

    df, built = await run_blocking(ctx, work)
    df = df.reset_index().rename(columns={"index": "gene"})
    out = {"dataset": dataset, "mode": mode,
           **_table(df, f"{mode}_autocorrelation", "spatial_autocorrelation", {"dataset": dataset, "mode": mode})}
    if built:
        out["graph_built"] = built
    return out


@mcp.tool
def nearest_neighbor_distances(
    dataset: Dataset,
    cluster_key: Annotated[str | None, Field(description="obs column with cell types for the per-type-pair table "
                                                         "and same-type fractions; omit for all cells only.")] = None,
) -> dict:
    """Nearest-neighbour distances, in the dataset's coordinate unit (see 'units').

    all_cells: distance from every cell to its nearest other cell, whatever its type — n_cells,
    mean, median, std, min, max, p10, p90 (mean = typical cell spacing / packing density).
    With cluster_key also: same_type_nn_fraction (fraction of cells whose nearest neighbour has
    their own type; high = segregated, low = mixed), same_type_nn_fraction_by_type, and rows: for
    each (source, target) type pair the distance from source cells to the nearest other target
    cell — mean, median, p10, p90 (e.g. how close CD8 T cells come to tumour cells)."""
    from servers.spatial import stats
    from servers.spatial.core import load_dataset as _load

    adata = _load(dataset)
    overall = stats.nn_overall(adata, cluster_key)
    out: dict[str, Any] = {"dataset": dataset, "units": _units(adata)}
    out["all_cells"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in overall.items()
                        if not k.startswith("same_type")}
    if cluster_key is not None:
        out["same_type_nn_fraction"] = round(overall["same_type_nn_fraction"], 6)
        out["same_type_nn_fraction_by_type"] = {k: round(v, 6) for k, v in
                                                overall["same_type_nn_fraction_by_type"].items()}
        df = stats.nn_distances(adata, cluster_key)
        out.update(_table(df, "nn_distances", "nearest_neighbor_distances",
                          {"dataset": dataset, "cluster_key": cluster_key}))
    return out


@mcp.tool
def cell_density(
    dataset: Dataset,
    cluster_key: Annotated[str | None, Field(description="obs column with cell types for per-type "
                                                         "densities; omit for all cells only.")] = None,
    sample_key: Annotated[str | None, Field(description="obs column with samples/FOVs: one area and "
                                                        "density per sample.")] = None,
    region: Literal["convex_hull", "bbox"] = "convex_hull",
    area_mm2: Annotated[float | None, Field(description="Tissue area in mm² if known (else from the cells).")] = None,
) -> dict:
    """Cells per mm², overall and per cell type (and per sample). The area is the convex hull (or bounding
    box) of the sample's cells unless area_mm2 is given. Needs µm coordinates or a known pixel size."""
    from servers.spatial import stats
    from servers.spatial.core import load_dataset as _load

    df = stats.density(_load(dataset), cluster_key, sample_key, region, area_mm2)
    return {"dataset": dataset, "region": region if area_mm2 is None else "given",
            **_table(df, "density", "cell_density", {"dataset": dataset, "cluster_key": cluster_key})}


@mcp.tool
async def cellular_neighborhoods(
    dataset: Dataset, cluster_key: CellTypeKey, ctx: Context,
    n_niches: int = 6, k: int = 10,
    radius: Annotated[float | None, Field(description="Window radius (coordinate units) instead of k nearest.")] = None,
    seed: int = 0, key_added: str = "niche",
) -> ToolResult:
    """Cellular neighbourhoods / niches: each cell's window composition (k nearest cells or a radius) is
    clustered with k-means into n_niches. Saves a new dataset with obs[key_added]; returns niche sizes,
    mean compositions, the most enriched types per niche, and a niche map."""
    from servers.spatial.core import load_dataset as _load

    def work():
        from servers.spatial import plots
        from servers.spatial.core import save_dataset
        from servers.spatial.niches import cellular_neighborhoods as run

        adata = _load(dataset)
        res = run(adata, cluster_key, n_niches=n_niches, k=k, radius=radius, seed=seed, key_added=key_added)
        png = plots.spatial_scatter(adata, color=key_added, title="cellular neighbourhoods")
        art = save_dataset(adata, name=f"niches_{key_added}", tool="cellular_neighborhoods",
                           args={"dataset": dataset, "cluster_key": cluster_key, "n_niches": n_niches, "k": k,
                                 "radius": radius, "seed": seed})
        return res, png, art

    res, png, art = await run_blocking(ctx, work)
    t = res.table()
    return tool_result({"dataset": art.id, "key": key_added,
                        "niches": t.reset_index(names="niche").round(4).to_dict("records")}, images=[png])


@mcp.tool
def distance_to_region(
    dataset: Dataset,
    cluster_key: str | None = None,
    target_types: Annotated[list[str] | None, Field(description="Distance to the nearest cell of these types.")] = None,
    polygon: Annotated[list[list[float]] | None, Field(description="Or: region polygon [[x, y], ...] in coordinate "
                                                                   "units; distance to its boundary, negative inside.")] = None,
    key_added: str = "distance_to_region",
    summarize_by: Annotated[str | None, Field(description="obs column to summarise distances by (e.g. cell type).")] = None,
) -> dict:
    """Distance of every cell to a region: the nearest cell of target_types (e.g. tumour), or a polygon
    boundary (signed: negative inside). Saves a new dataset with obs[key_added]; returns per-group
    count/mean/median distances in the dataset's coordinate unit, as a list (summary) and keyed by
    group name (summary_by_group, e.g. summary_by_group['CD8 T cells'].mean)."""
    from servers.common.errors import ToolError
    from servers.spatial import stats
    from servers.spatial.core import load_dataset as _load
    from servers.spatial.core import save_dataset

    adata = _load(dataset)
    if polygon is not None:
        stats.distance_to_polygon(adata, polygon, key_added=key_added)
    elif target_types and cluster_key:
        stats.distance_to_types(adata, cluster_key, target_types, key_added=key_added)
    else:
        raise ToolError("Say what the region is.", hint="Pass cluster_key + target_types, or polygon.")
    by = summarize_by or cluster_key
    col = adata.obs[key_added]
    if by:
        if by not in adata.obs:
            raise ToolError(f"Unknown column {by!r} to summarise by.")
        g = col.groupby(adata.obs[by].astype(str), observed=True).agg(["count", "mean", "median"])
        by_group = {str(k): {"count": int(r["count"]), "mean": round(float(r["mean"]), 6),
                             "median": round(float(r["median"]), 6)} for k, r in g.iterrows()}
        summary = g.reset_index().round(4).to_dict("records")
    else:
        summary = [{"count": int(col.count()), "mean": float(col.mean()), "median": float(col.median())}]
        by_group = None
    art = save_dataset(adata, name=key_added, tool="distance_to_region",
                       args={"dataset": dataset, "cluster_key": cluster_key, "target_types": target_types,
                             "polygon": polygon})
    out = {"dataset": art.id, "key": key_added, "units": _units(adata), "summary": summary}
    if by_group is not None:
        out["summary_by_group"] = by_group
    return out


@mcp.tool(annotations={"readOnlyHint": True})
def plot_spatial(
    dataset: Dataset,
    color: Annotated[str | None, Field(description="obs column (cell type, niche, numeric) or gene/marker name.")] = None,
    point_size: float | None = None,
) -> ToolResult:
    """Scatter plot of cells at their coordinates, coloured by cell type / cluster / niche or by a gene's
    expression. Returns the PNG (also saved as a figure artifact)."""
    from servers.common.workspace import get_workspace
    from servers.spatial import plots
    from servers.spatial.core import load_dataset as _load

    adata = _load(dataset)
    png = plots.spatial_scatter(adata, color=color, point_size=point_size)
    art = get_workspace().save_bytes(png, kind="figure", name=f"spatial_{color or 'cells'}",
                                     provenance={"tool": "plot_spatial", "args": {"dataset": dataset, "color": color}})
    return tool_result({"dataset": dataset, "figure": art.id, "n_cells": int(adata.n_obs)}, images=[png])
