"""What a sandbox kernel offers, collected *inside* the kernel (standard library only).

``collect()`` returns the Python version, the scientific packages that can be imported (with
versions, found without importing them), the project's own library modules, and the data root,
workspace and limits as seen from inside. The server runs it through ``Kernel.execute``.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import pkgutil
import platform
import resource
import sys

#: import name → distribution name
SCIENTIFIC = {
    "numpy": "numpy", "scipy": "scipy", "pandas": "pandas", "skimage": "scikit-image",
    "sklearn": "scikit-learn", "cv2": "opencv-python-headless", "matplotlib": "matplotlib",
    "PIL": "pillow", "tifffile": "tifffile", "pyarrow": "pyarrow", "anndata": "anndata",
    "scanpy": "scanpy", "squidpy": "squidpy", "shapely": "shapely", "openslide": "openslide-python",
    "torch": "torch", "onnxruntime": "onnxruntime", "optuna": "optuna", "dask": "dask",
    "zarr": "zarr", "h5py": "h5py", "networkx": "networkx", "statsmodels": "statsmodels",
    "seaborn": "seaborn", "numba": "numba", "cellpose": "cellpose", "stardist": "stardist",
}
PROJECT_PACKAGES = ("servers",)


def _version(import_name: str, dist: str) -> str | None:
    for name in (dist, import_name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return "unknown"


def packages() -> dict[str, str]:
    """Importable scientific packages → version (checked with find_spec, not imported)."""
    out = {}
    for mod, dist in SCIENTIFIC.items():
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            if mod == "cv2" and _version(mod, dist) == "unknown":
                out[mod] = _version(mod, "opencv-python")
            else:
                out[mod] = _version(mod, dist)
    return out


def project_modules() -> list[str]:
    """Importable modules of the project's library (e.g. ``servers.spatial.cooccurrence``)."""
    found = []
    for top in PROJECT_PACKAGES:
        try:
            spec = importlib.util.find_spec(top)
        except ImportError:
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for info in pkgutil.walk_packages(list(spec.submodule_search_locations), prefix=top + ".",
                                          onerror=lambda _n: None):
            name = info.name
            if name.endswith(".server") or ".tests" in name or name.startswith("servers.sandbox.driver"):
                continue
            found.append(name)
    return sorted(found)


def _limit(r: int) -> int | None:
    soft, _ = resource.getrlimit(r)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def collect() -> dict:
    mem = _limit(resource.RLIMIT_AS)
    fsize = _limit(resource.RLIMIT_FSIZE)
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "packages": packages(),
        "project_modules": project_modules(),
        "data_root": os.environ.get("CYTOAGENT_DATA_ROOT"),
        "workspace": os.environ.get("CYTOAGENT_WORKSPACE"),
        "cwd": os.getcwd(),
        "aliases": {"/data": os.path.islink("/data"), "/workspace": os.path.islink("/workspace")},
        "uid": os.getuid(),
        "cpu_count": os.cpu_count(),
        "threads_per_library": os.environ.get("OMP_NUM_THREADS"),
        "limits": {
            "memory_mb": mem // (1024 * 1024) if mem else None,
            "max_file_mb": fsize // (1024 * 1024) if fsize else None,
        },
        "tmp": "/tmp (private, in memory, erased when the kernel restarts)",
    }
