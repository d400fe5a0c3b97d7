"""Preprocessing optimisation: tasks, sandboxed evaluation of preprocess_images code, function bank.

After the agentic-superoptimisation paper: a fixed downstream tool (a spot detector, a nucleus
segmenter) is a black box; a model writes ``preprocess_images(images) -> images`` functions, each
is run in the sandbox and scored on a validation split, and the function bank keeps every score.
"""

from __future__ import annotations

from typing import Any, Literal

from fastmcp import Context
from fastmcp.tools import ToolResult

from cytoagent.mcpkit import create_server, run_blocking, tool_result

mcp = create_server(
    "preprocess",
    "Optimise image preprocessing for a fixed downstream tool. Start with list_tasks and describe_task "
    "(data, downstream tool, metric, function signature, primitives, best/worst functions so far). Write a "
    "Python function `preprocess_images(images) -> list of images` (numpy + cv2) and score it with "
    "evaluate_preprocessing on the validation split; iterate using the scores, per-image metrics and "
    "error messages. bank_top / bank_bottom / bank_history show earlier functions; evaluate_on_test scores "
    "the top-K on the held-out test split at the end. detect_spots counts spots in any image with the same "
    "detector (with a chosen normalisation), returning a spots table and a preview.",
)

MAX_PER_IMAGE = 40


def _task(name: str):
    from servers.preprocess.tasks import get_task

    return get_task(name)


def _bank():
    from servers.preprocess.bank import get_bank

    return get_bank()


def _clip_k(k: int, hi: int = 50) -> int:
    return max(1, min(int(k), hi))


@mcp.tool(annotations={"readOnlyHint": True})
def list_tasks() -> dict:
    """List the preprocessing-optimisation tasks: name, kind (spots | nuclei), metric, expert baseline,
    whether its data is available here, and a one-line description. Use a name with describe_task."""
    from servers.preprocess.tasks import all_tasks

    return {"tasks": [t.summary() for t in all_tasks().values()]}


def describe(task_name: str, bank_k: int = 3) -> dict[str, Any]:
    """Library function behind ``describe_task`` (also used by the optimisation loop's LLM proposer)."""
    from servers.preprocess.primitives import describe_primitives
    from servers.preprocess.tasks import SIGNATURE

    t = _task(task_name)
    ok, why = t.available()
    data, _, task_text = t.description.partition("\n\n")
    out: dict[str, Any] = {
        "task": t.name, "kind": t.kind, "available": ok, "data_description": data.strip(),
        "task_description": (task_text or data).strip(), "metric": t.metric,
        "downstream": t.make_downstream().describe(), "signature": SIGNATURE,
        "contract": ("Return a list with one numeric array per input image, same (H, W) and channel layout, "
                     "finite values. " + ("RGB outputs are converted to uint8 (floats <= 1 are scaled by 255)."
                                          if t.rgb else "Outputs are passed to the downstream tool as float32.")),
        "expert_baseline": {"name": t.expert, "code": t.expert_code()},
        "primitives": describe_primitives(), "origin": t.origin,
    }
    if not ok:
        out["unavailable_because"] = why
        return out
    out["splits"] = {}
    for s in ("val", "test"):
        samples = t.samples(s)
        shapes = sorted({tuple(x.image.shape) for x in samples})
        out["splits"][s] = {"n_images": len(samples), "shapes": [list(x) for x in shapes[:5]],
                            "dtypes": sorted({str(x.image.dtype) for x in samples})}
    if bank_k > 0:
        from servers.preprocess.evaluate import code_hash

        b = _bank()
        fp = t.fingerprint
        out["bank"] = {"best": b.top(fp, bank_k), "worst": b.top(fp, bank_k, worst=True), "counts": b.counts(fp)}
        for r in out["bank"]["best"] + out["bank"]["worst"]:
            r.pop("per_image", None)
        exp = b.lookup(fp, "val", code_hash(out["expert_baseline"]["code"]))
        out["expert_baseline"]["val_score"] = exp["score"] if exp else None
    return out


@mcp.tool(annotations={"readOnlyHint": True})
def describe_task(task: str, bank_k: int = 3) -> dict:
    """Everything needed to write a preprocessing function for a task: data description, downstream tool
    and its fixed settings, metric, function signature and output contract, the expert baseline code,
    the primitive library (OpenCV/NumPy building blocks with parameter ranges), split sizes, and the
    best and worst functions so far from the function bank (with scores).

    Args:
        task: Task name from list_tasks (e.g. "smfish", "spots_synthetic", "he_nuclei").
        bank_k: How many best and worst bank functions to include (0 = none).
    """
    return describe(task, max(0, min(int(bank_k), 20)))


def evaluate_and_record(task_name: str, code: str, split: str = "val", *, timeout_s: float = 60.0,
                        preview: bool = True, origin: str = "mcp") -> tuple[dict[str, Any], bytes | None]:
    """Evaluate ``code`` (cached by code hash in the bank) and return (summary, preview PNG)."""
    from servers.preprocess.evaluate import code_hash, evaluate_code, evaluation_preview

    t = _task(task_name)
    b = _bank()
    h = code_hash(code) if isinstance(code, str) else ""
    cached = b.lookup(t.fingerprint, split, h) if h and split in ("val", "test") else None
    if cached is not None and not preview:
        cached.update(cached=True)
        return cached, None
    ev = evaluate_code(t, code, split, timeout_s=timeout_s, keep_outputs=preview)
    b.record(t.name, t.fingerprint, ev.to_dict(), code=code, origin=origin)
    png = evaluation_preview(t, ev) if preview else None
    return {**ev.to_dict(), "cached": False}, png


@mcp.tool
async def evaluate_preprocessing(task: str, code: str, ctx: Context, split: str = "val", timeout_s: float = 60.0,
                                 preview: bool = True) -> ToolResult:
    """Score a preprocessing function: the code runs in the isolated sandbox (time-limited, no network, no
    access to ground truth), its outputs are checked (count, shape, channels, dtype, NaN), the task's fixed
    downstream tool runs on them and the metric is computed. Failures (no function, exception, wrong
    shape, NaN, timeout, killed kernel) come back as status != "ok", score 0 and a readable error.
    Every result is stored in the function bank.

    Args:
        task: Task name from list_tasks.
        code: Python source defining `def preprocess_images(images): ... return [processed images]`.
        split: "val" while optimising; "test" only for a final check (see evaluate_on_test).
        timeout_s: Wall-clock limit for running the function on all images of the split (seconds).
        preview: Return a PNG of the first processed images with detections/outlines (and re-run even if
            this exact code was scored before).

    Returns:
        status, score (metric in [0, 1], higher is better), per-image metrics, error, code_hash, timings.
    """
    if not 0 < float(timeout_s) <= 600:
        from servers.common.errors import ToolError

        raise ToolError(f"timeout_s={timeout_s} is out of range.", hint="Pass 0 < timeout_s <= 600 seconds.")
    summary, png = await run_blocking(ctx, evaluate_and_record, task, code, split, timeout_s=float(timeout_s),
                                      preview=bool(preview))
    per = summary.get("per_image") or []
    if len(per) > MAX_PER_IMAGE:
        summary["per_image"] = per[:MAX_PER_IMAGE]
        summary["per_image_truncated"] = len(per) - MAX_PER_IMAGE
    return tool_result(summary, images=[png] if png else None)


@mcp.tool(annotations={"readOnlyHint": True})
def bank_top(task: str, k: int = 5, split: str = "val", include_code: bool = True) -> dict:
    """The k best functions in the bank for a task by score on a split (ties: earliest first).

    Args:
        task: Task name.
        k: How many (1-50).
        split: "val" or "test".
        include_code: Include each function's source.
    """
    t = _task(task)
    rows = _bank().top(t.fingerprint, _clip_k(k), split, with_code=include_code)
    for r in rows:
        r.pop("per_image", None)
    return {"task": t.name, "metric": t.metric, "split": split, "functions": rows}


@mcp.tool(annotations={"readOnlyHint": True})
def bank_bottom(task: str, k: int = 5, split: str = "val", include_failures: bool = False,
                include_code: bool = True) -> dict:
    """The k worst functions in the bank for a task (successful runs only unless include_failures).

    Args:
        task: Task name.
        k: How many (1-50).
        split: "val" or "test".
        include_failures: Also list failed functions (status != ok, score 0) with their errors.
        include_code: Include each function's source.
    """
    t = _task(task)
    rows = _bank().top(t.fingerprint, _clip_k(k), split, worst=True, include_failures=include_failures,
                       with_code=include_code)
    for r in rows:
        r.pop("per_image", None)
    return {"task": t.name, "metric": t.metric, "split": split, "functions": rows}


@mcp.tool(annotations={"readOnlyHint": True})
def bank_history(task: str, limit: int = 20, offset: int = 0, split: str = "val") -> dict:
    """Evaluations of a task in the order they were made: code_hash, status, score, error, duration.

    Args:
        task: Task name.
        limit: Rows to return (1-200).
        offset: Rows to skip (page through long histories).
        split: "val" or "test".
    """
    t = _task(task)
    b = _bank()
    return {"task": t.name, "split": split, "counts": b.counts(t.fingerprint),
            "evaluations": b.history(t.fingerprint, split, _clip_k(limit, 200), max(0, int(offset)))}


@mcp.tool(annotations={"readOnlyHint": True})
def get_function(code_hash: str) -> dict:
    """The source code of a bank function by its code_hash."""
    return {"code_hash": code_hash, "code": _bank().code(code_hash)}


def evaluate_top_on_test(task_name: str, k: int = 5, timeout_s: float = 60.0, progress=None) -> dict[str, Any]:
    """Evaluate the top-k validation functions (and the expert baseline) on the test split."""
    from servers.common.progress import track
    from servers.preprocess.evaluate import code_hash

    t = _task(task_name)
    b = _bank()
    top = b.top(t.fingerprint, k)
    expert = t.expert_code()
    rows = []
    items = [("expert", expert)] + [(r["code_hash"], r["code"]) for r in top]
    for key, code in track(items, progress, message="test evaluations"):
        res = {}
        for split in ("val", "test"):
            s, _ = evaluate_and_record(t.name, code, split, timeout_s=timeout_s, preview=False,
                                       origin="expert" if key == "expert" else "mcp")
            res[split] = s["score"] if s["status"] == "ok" else None
            res[f"{split}_status"] = s["status"]
        rows.append({"code_hash": code_hash(code), "which": "expert" if key == "expert" else "bank", **res})
    bank_rows = [r for r in rows if r["which"] == "bank" and r["test"] is not None]
    best_val = bank_rows[0] if bank_rows else None
    return {"task": t.name, "metric": t.metric, "k": len(top), "functions": rows,
            "expert": rows[0], "best_val_function_test": best_val["test"] if best_val else None,
            "top_k_test_max": max((r["test"] for r in bank_rows), default=None)}


@mcp.tool
async def evaluate_on_test(task: str, ctx: Context, k: int = 5, timeout_s: float = 60.0) -> dict:
    """Final check: score the top-k functions by validation score (and the expert baseline) on the held-out
    test split. Report the test score of the best-validation function; the max over top-k is optimistic.

    Args:
        task: Task name.
        k: How many top validation functions (1-50).
        timeout_s: Per-function time limit (seconds).
    """
    return await run_blocking(ctx, evaluate_top_on_test, task, _clip_k(k), float(timeout_s))


Preprocess = Literal["none", "minmax", "percentile", "normalize99", "divide_255"]


@mcp.tool
async def detect_spots(image: str, ctx: Context, preprocess: Preprocess = "none", task: str | None = None,
                       pipeline: list[dict[str, Any]] | None = None, channel: int | None = None,
                       sigma: float | None = None, threshold: float | None = None, min_distance: int | None = None,
                       exclude_border: int | None = None, preview: bool = True) -> ToolResult:
    """Count diffraction-limited spots (smFISH transcripts, puncta) in one image with the project's
    Laplacian-of-Gaussian detector (the same one the spot tasks score): local maxima of the
    scale-normalised LoG response above an ABSOLUTE threshold. Saves the spots as a table artifact
    (spot_id, row, col in pixels, LoG response, raw intensity) and returns a preview with every spot
    circled. Use it to answer "how many spots" questions; compare images with the same settings.

    Because the threshold is absolute, normalise first when the image is in raw units (uint16
    counts, arbitrary scale): preprocess="minmax" or "percentile" maps it to [0, 1]; 8-bit images
    can use "divide_255". task= applies a preprocessing task's expert normalisation and its fixed
    detector settings (see list_tasks); pipeline= gives explicit primitive steps instead (names and
    parameters as in describe_task's primitives), e.g. [{"name": "subtract_background", "sigma": 20},
    {"name": "minmax_normalize"}].

    Args:
        image: Image path relative to the data root (TIFF, PNG, JPEG or NPY; one channel or RGB).
        preprocess: Named normalisation: "none", "minmax", "percentile" (1-99.8 %), "normalize99"
            (1-99 %), "divide_255".
        task: A spots task name whose expert normalisation and detector settings to use.
        pipeline: Explicit preprocessing steps (list of {"name": primitive, params...}); excludes
            preprocess/task.
        channel: Channel of a multi-channel image (0-based); default: the mean of the channels.
        sigma: LoG scale in pixels (about spot radius / 1.41; default 1.5).
        threshold: Minimum LoG response of a spot in preprocessed-image units (default 0.1).
        min_distance: Minimum distance between two spots in pixels (default 2).
        exclude_border: Ignore maxima this many pixels from the border (default 0).
        preview: Return a PNG with the detected spots circled.

    Returns:
        n_spots, detector settings, preprocessing applied, table_artifact (spots), first spots.
    """
    from servers.common.paths import resolve_data_path
    from servers.common.workspace import get_workspace
    from servers.preprocess.spots import count_spots, read_image_2d, spots_preview

    path = resolve_data_path(image)
    arr = read_image_2d(path, channel)
    res = await run_blocking(ctx, count_spots, arr, preprocess=preprocess, task=task, pipeline=pipeline,
                             sigma=sigma, threshold=threshold, min_distance=min_distance,
                             exclude_border=exclude_border)
    prov = {"tool": "preprocess.detect_spots",
            "args": {"image": image, "preprocess": preprocess, "task": task, "pipeline": pipeline,
                     "channel": channel, **res.settings}}
    art = get_workspace().save_table(res.table, name="spots", provenance=prov, meta={"image": image})
    summary = {"image": image, **res.summary(), "table_artifact": art.id,
               "first_spots": res.table.head(10).round(3).to_dict("records")}
    return tool_result(summary, images=[spots_preview(arr, res.coords)] if preview else None)


@mcp.tool
def add_task(folder: str) -> dict:
    """Register a task folder (path relative to the data root) holding images, ground truth and a task.toml
    or task.yaml (keys: name, kind = spots | nuclei, images glob, truth pattern with {stem}, optional
    description, expert, mpp, tile/grid, [downstream], [split]). Returns the task's summary.

    Args:
        folder: Folder relative to the data root, e.g. "preprocess_tasks/my_spots".
    """
    from servers.preprocess.tasks import register_task_folder

    t = register_task_folder(folder)
    s = t.summary()
    if s["available"]:
        s["splits"] = {sp: len(t.samples(sp)) for sp in ("val", "test")}
    return s
