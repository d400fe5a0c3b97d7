"""Configuration from environment variables and an optional TOML file.

Precedence (highest first): environment variables, the TOML file named by ``CYTOAGENT_CONFIG``
(default ``~/.config/cytoagent/config.toml``), built-in defaults.

Environment variables:
    CYTOAGENT_DATA_ROOT   read-only root that tool paths are resolved against
    CYTOAGENT_WORKSPACE   read-write directory shared by all servers (artifacts, index)
    CYTOAGENT_EXECUTOR    "local" (process pool, default) or "dask"
    CYTOAGENT_DASK_ADDRESS  scheduler address when the executor is "dask"
    CYTOAGENT_WORKERS     worker count for the local pool
    CYTOAGENT_REQUIRE_ISOLATION  "1" refuses to run sandbox code without bubblewrap
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path

from servers.common.errors import ToolError


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cytoagent"


@dataclass(frozen=True)
class Limits:
    """Caps that protect servers from huge requests."""

    max_image_pixels: int = 64_000_000  # one region/array read into memory
    max_preview_side: int = 1024  # PNG previews are downscaled to this
    max_table_rows_inline: int = 50  # rows returned inline; the rest go to artifacts
    max_output_chars: int = 20_000  # text returned by one tool call
    max_sessions: int = 8  # sandbox kernels alive at once


@dataclass(frozen=True)
class Config:
    data_root: Path = field(default_factory=lambda: default_cache_dir() / "data")
    workspace: Path = field(default_factory=lambda: default_cache_dir() / "workspace")
    executor: str = "local"
    dask_address: str | None = None
    workers: int = max(1, (os.cpu_count() or 2))
    require_isolation: bool = False
    limits: Limits = field(default_factory=Limits)

    def with_overrides(self, **kw) -> Config:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def env(self) -> dict[str, str]:
        """Environment variables that reproduce this config in a child process."""
        env = {
            "CYTOAGENT_DATA_ROOT": str(self.data_root),
            "CYTOAGENT_WORKSPACE": str(self.workspace),
            "CYTOAGENT_EXECUTOR": self.executor,
            "CYTOAGENT_WORKERS": str(self.workers),
        }
        if self.dask_address:
            env["CYTOAGENT_DASK_ADDRESS"] = self.dask_address
        if self.require_isolation:
            env["CYTOAGENT_REQUIRE_ISOLATION"] = "1"
        return env


def _truthy(v: str | None) -> bool:
    return str(v).strip().lower() in {"1", "true", "yes", "on"}


def load_config(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> Config:
    """Build a Config from a TOML file (optional) and environment variables."""
    env = os.environ if environ is None else environ
    path = path or env.get("CYTOAGENT_CONFIG") or (Path.home() / ".config" / "cytoagent" / "config.toml")
    values: dict = {}
    p = Path(path).expanduser()
    if p.is_file():
        try:
            raw = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ToolError(f"Config file {p} is not valid TOML: {e}") from e
        raw = raw.get("cytoagent", raw)
        known = {f.name for f in fields(Config)}
        values = {k: v for k, v in raw.items() if k in known and k != "limits"}
        if isinstance(raw.get("limits"), dict):
            lk = {f.name for f in fields(Limits)}
            values["limits"] = Limits(**{k: v for k, v in raw["limits"].items() if k in lk})
    if env.get("CYTOAGENT_DATA_ROOT"):
        values["data_root"] = env["CYTOAGENT_DATA_ROOT"]
    if env.get("CYTOAGENT_WORKSPACE"):
        values["workspace"] = env["CYTOAGENT_WORKSPACE"]
    if env.get("CYTOAGENT_EXECUTOR"):
        values["executor"] = env["CYTOAGENT_EXECUTOR"]
    if env.get("CYTOAGENT_DASK_ADDRESS"):
        values["dask_address"] = env["CYTOAGENT_DASK_ADDRESS"]
    if env.get("CYTOAGENT_WORKERS"):
        values["workers"] = int(env["CYTOAGENT_WORKERS"])
    if "CYTOAGENT_REQUIRE_ISOLATION" in env:
        values["require_isolation"] = _truthy(env["CYTOAGENT_REQUIRE_ISOLATION"])
    for key in ("data_root", "workspace"):
        if key in values:
            values[key] = Path(values[key]).expanduser().resolve()
    if values.get("executor", "local") not in {"local", "dask"}:
        raise ToolError(f"Unknown executor {values['executor']!r}.", hint='Use "local" or "dask".')
    return Config(**values)


@lru_cache(maxsize=1)
def get_config() -> Config:
    """The process-wide config (read once)."""
    return load_config()


def reset_config() -> None:
    """Forget the cached config (tests change the environment)."""
    get_config.cache_clear()
    from servers.common import workspace

    workspace.get_workspace.cache_clear()
