"""Locating local model weights for the model-backed segmenters, with errors that say what to do.

No weights are downloaded. A backend gets its weights from, in order:

1. ``weights=`` passed to ``get_segmenter`` — an absolute path, or a path relative to the data root
   or the workspace (both confined: no ``..`` escapes);
2. the environment variable ``CYTOAGENT_<BACKEND>_WEIGHTS`` (e.g. ``CYTOAGENT_UNET_WEIGHTS``);
3. ``<workspace>/models/<backend>/`` — where ``cytoagent segmenters train`` writes;
4. backend-specific defaults: for ``unet`` ``<data_root>/models/unet2d_nuclei_broad`` (the
   bioimage.io example model); for ``cellpose`` ``$CELLPOSE_LOCAL_MODELS_PATH`` or
   ``~/.cellpose/models`` (Cellpose's own cache, e.g. ``weights="nuclei"`` → ``nucleitorch_0``).

A folder is searched for the backend's file types (newest first when several match).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from servers.common.errors import ToolError


@dataclass(frozen=True)
class WeightSpec:
    """What a backend's weights look like on disk."""

    backend: str
    extra: str
    patterns: tuple[str, ...]  # file globs searched inside a folder, in order of preference
    is_dir_model: bool = False  # the model *is* a folder (StarDist: config.json + weights_*.h5)
    default_dirs: tuple[str, ...] = ()  # relative to the data root


SPECS: dict[str, WeightSpec] = {
    "unet": WeightSpec("unet", "unet", ("weights.pt", "*.pt", "*.pth", "weights.onnx", "*.onnx"),
                       default_dirs=("models/unet2d_nuclei_broad",)),
    "cellpose": WeightSpec("cellpose", "cellpose", ("*cellpose*", "*torch*", "*.pth", "*.pt", "*")),
    "stardist": WeightSpec("stardist", "stardist", ("config.json",), is_dir_model=True),
}


def env_var(backend: str) -> str:
    return f"CYTOAGENT_{backend.upper()}_WEIGHTS"


def cellpose_cache_dir() -> Path:
    return Path(os.environ.get("CELLPOSE_LOCAL_MODELS_PATH") or Path.home() / ".cellpose" / "models")


def workspace_models_dir(backend: str) -> Path:
    from servers.common.config import get_config

    return Path(get_config().workspace) / "models" / backend


def _search_dir(spec: WeightSpec, folder: Path) -> Path | None:
    """The model inside ``folder`` (or ``folder`` itself for folder models), newest first."""
    if not folder.is_dir():
        return None
    if spec.is_dir_model:
        if (folder / "config.json").is_file():
            return folder
        subs = [d for d in folder.iterdir() if (d / "config.json").is_file()]
        return max(subs, key=lambda d: d.stat().st_mtime) if subs else None
    for pat in spec.patterns:
        hits = [p for p in folder.glob(pat) if p.is_file() and not p.name.startswith(".")
                and p.suffix not in (".json", ".yaml", ".yml", ".md", ".txt", ".npy", ".py", ".csv")]
        if hits:
            return max(hits, key=lambda p: p.stat().st_mtime)
    return None


def _user_candidates(weights: str | os.PathLike) -> list[Path]:
    p = Path(weights).expanduser()
    if p.is_absolute():
        return [p]
    from servers.common.config import get_config
    from servers.common.paths import confine

    cfg = get_config()
    out = []
    for root in (cfg.data_root, cfg.workspace):
        try:
            out.append(confine(root, str(weights), what="weights", must_exist=False))
        except ToolError:
            raise
        except Exception:  # pragma: no cover - defensive: unusable root
            continue
    return out


def missing_weights_error(backend: str, tried: list[Path], what: str | None = None) -> ToolError:
    spec = SPECS[backend]
    kind = "a model folder (config.json + weights_best.h5)" if spec.is_dir_model else \
        "a weights file (" + ", ".join(p for p in spec.patterns if p != "*") + ")"
    where = "; ".join(str(t) for t in tried) or "(nowhere)"
    msg = what or f"No {backend} weights found."
    return ToolError(
        f"{msg} Looked in: {where}.",
        hint=(f"Pass weights=<path to {kind}>, set {env_var(backend)}, or train some with "
              f"`cytoagent segmenters train {backend}` (writes to <workspace>/models/{backend}/). "
              f"The backend needs `pip install 'cytoagent[{spec.extra}]'`. Pretrained weights cannot be "
              f"downloaded here; copy them in.") if backend != "unet" else
             (f"Pass weights=<path to the bioimage.io unet2d_nuclei_broad folder, weights.pt or weights.onnx>, "
              f"or set {env_var(backend)}. Needs `pip install 'cytoagent[unet]'` (torch or onnxruntime)."),
    )


def find_weights(backend: str, weights: str | os.PathLike | None = None) -> Path:
    """Resolve the weights for ``backend`` (see module docstring); raise ToolError naming every place tried."""
    if backend not in SPECS:
        raise ToolError(f"Backend {backend!r} takes no weights.", hint=f"Weights apply to: {', '.join(SPECS)}.")
    spec = SPECS[backend]
    tried: list[Path] = []

    def check(path: Path) -> Path | None:
        tried.append(path)
        if spec.is_dir_model:
            return _search_dir(spec, path)
        if path.is_file():
            return path
        return _search_dir(spec, path)

    if weights is not None and str(weights) != "":
        name = str(weights)
        cands = _user_candidates(name)
        if backend == "cellpose" and "/" not in name and not Path(name).suffix:
            cache = cellpose_cache_dir()
            cands += [cache / name, cache / f"{name}torch_0", cache / f"cyto3_{name}"]
        for c in cands:
            hit = check(c)
            if hit is not None:
                return hit
        raise missing_weights_error(backend, tried, f"{backend} weights {name!r} not found.")

    env = os.environ.get(env_var(backend))
    if env:
        hit = check(Path(env).expanduser())
        if hit is not None:
            return hit
        raise missing_weights_error(backend, tried, f"{env_var(backend)}={env} holds no {backend} model.")

    hit = check(workspace_models_dir(backend))
    if hit is not None:
        return hit
    from servers.common.config import get_config

    for rel in spec.default_dirs:
        hit = check(Path(get_config().data_root) / rel)
        if hit is not None:
            return hit
    if backend == "cellpose":
        hit = check(cellpose_cache_dir())
        if hit is not None:
            return hit
    raise missing_weights_error(backend, tried)


def list_weights(backend: str) -> list[Path]:
    """Model files/folders found in ``<workspace>/models/<backend>/`` (for ``segmenters list``)."""
    spec = SPECS[backend]
    folder = workspace_models_dir(backend)
    if not folder.is_dir():
        return []
    if spec.is_dir_model:
        return sorted(d for d in folder.iterdir() if (d / "config.json").is_file())
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix not in (".json", ".log", ".txt"))
