"""Public demo/benchmark datasets: ``cytoagent data list`` and ``cytoagent data fetch [NAME]``.

Every file is pinned by SHA-256 in ``data_manifest.json``. ``fetch`` takes each file from the
first place that has it with the right checksum: the destination (already fetched), a local
mirror (``--mirror`` or ``CYTOAGENT_DATA_MIRROR``), or its public URL. The destination defaults
to the configured data root (``CYTOAGENT_DATA_ROOT``, else ``~/.cache/cytoagent/data``), so the
servers see fetched data at once. Nothing is half-written: downloads land in a temp file and are
renamed only after the checksum matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from servers.common.atomic import atomic_path
from servers.common.errors import ToolError

MANIFEST = Path(__file__).with_name("data_manifest.json")


@dataclass
class FileEntry:
    path: str
    sha256: str
    size: int
    url: str | None


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def dataset_files(name: str, manifest: dict | None = None) -> list[FileEntry]:
    m = manifest or load_manifest()
    if name not in m["datasets"]:
        raise ToolError(f"Unknown dataset {name!r}.", hint=f"Known datasets: {', '.join(m['datasets'])}.")
    ds = m["datasets"][name]
    base_url = ds.get("base_url")
    out = []
    for rel, (sha, size) in ds["files"].items():
        url = ds.get("urls", {}).get(rel) or (base_url + rel.split("/", 1)[1] if base_url and "/" in rel else None)
        out.append(FileEntry(rel, sha, size, url))
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, entry: FileEntry) -> bool:
    return path.is_file() and path.stat().st_size == entry.size and sha256_of(path) == entry.sha256


def fetch(names: list[str] | None = None, *, dest: str | os.PathLike | None = None,
          mirror: str | os.PathLike | None = None, progress=None) -> dict:
    """Make the named datasets (default: all) present and verified under ``dest``.

    Returns counts per source (``present``, ``mirror``, ``download``). Raises ToolError listing
    files that could not be obtained (no mirror copy, no URL, or a checksum mismatch).
    """
    from servers.common.config import get_config

    manifest = load_manifest()
    names = names or list(manifest["datasets"])
    dest_dir = Path(dest).expanduser().resolve() if dest else get_config().data_root
    mirror = mirror or os.environ.get("CYTOAGENT_DATA_MIRROR")
    mirror_dir = Path(mirror).expanduser().resolve() if mirror else None
    if mirror_dir is not None and not mirror_dir.is_dir():
        raise ToolError(f"Mirror folder {mirror_dir} does not exist.", hint="Pass --mirror DIR pointing at a data copy.")
    entries = [e for n in names for e in dataset_files(n, manifest)]
    counts = {"present": 0, "mirror": 0, "download": 0}
    failures: list[str] = []
    for i, e in enumerate(entries):
        target = dest_dir / e.path
        if _verified(target, e):
            counts["present"] += 1
        elif mirror_dir is not None and _verified(mirror_dir / e.path, e):
            with atomic_path(target) as tmp:
                shutil.copyfile(mirror_dir / e.path, tmp)
            counts["mirror"] += 1
        elif e.url:
            try:
                with atomic_path(target) as tmp:
                    with urllib.request.urlopen(e.url, timeout=60) as r, open(tmp, "wb") as fh:
                        shutil.copyfileobj(r, fh)
                    got = sha256_of(tmp)
                    if got != e.sha256:
                        raise ToolError(f"checksum mismatch for {e.path} from {e.url} (got {got[:12]}…)")
                counts["download"] += 1
            except (OSError, ToolError) as err:
                failures.append(f"{e.path}: {err}")
        else:
            failures.append(f"{e.path}: no verified mirror copy and no public URL pinned")
        if progress:
            progress(i + 1, len(entries), e.path)
    if failures:
        head = "\n  ".join(failures[:10])
        more = f"\n  … and {len(failures) - 10} more" if len(failures) > 10 else ""
        raise ToolError(
            f"{len(failures)} of {len(entries)} files could not be fetched into {dest_dir}:\n  {head}{more}",
            hint="Without network access, point --mirror (or CYTOAGENT_DATA_MIRROR) at a local copy.",
        )
    return {"dest": str(dest_dir), "files": len(entries), **counts}


def status(dest: str | os.PathLike | None = None) -> list[dict]:
    from servers.common.config import get_config

    manifest = load_manifest()
    dest_dir = Path(dest).expanduser().resolve() if dest else get_config().data_root
    rows = []
    for name, ds in manifest["datasets"].items():
        files = dataset_files(name, manifest)
        present = sum((dest_dir / f.path).is_file() and (dest_dir / f.path).stat().st_size == f.size for f in files)
        rows.append({"name": name, "files": len(files), "present": present,
                     "mb": round(sum(f.size for f in files) / 1e6, 1), "description": ds["description"],
                     "license": ds.get("license", "")})
    return rows


def build_manifest(source_dir: str | os.PathLike, template: dict) -> dict:
    """Recompute file hashes from a verified copy (maintainers run this when data changes)."""
    src = Path(source_dir)
    out = {"datasets": {}}
    for name, ds in template["datasets"].items():
        files = {}
        for root in ds["roots"]:
            p = src / root
            items = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
            for f in items:
                files[str(f.relative_to(src))] = [sha256_of(f), f.stat().st_size]
        out["datasets"][name] = {**ds, "files": files}
    return out


# -- CLI ---------------------------------------------------------------------------------------
def _cmd_list(args) -> int:
    rows = status(args.dest)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="cytoagent datasets")
    for c in ("name", "files", "present", "mb", "description"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], str(r["files"]), str(r["present"]), str(r["mb"]), r["description"])
    Console(stderr=False).print(t)
    return 0


def _cmd_fetch(args) -> int:
    from rich.progress import Progress

    with Progress(transient=True, console=None) as bar:
        task = bar.add_task("fetching", total=None)

        def progress(done, total, msg):
            bar.update(task, completed=done, total=total, description=str(msg)[-50:])

        result = fetch(args.names or None, dest=args.dest, mirror=args.mirror, progress=progress)
    print(json.dumps(result), file=sys.stdout)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="list / fetch the public demo and benchmark datasets")
    dsub = p.add_subparsers(dest="data_cmd", metavar="ACTION")
    lp = dsub.add_parser("list", help="datasets and whether they are present")
    lp.add_argument("--dest")
    lp.add_argument("--json", action="store_true")
    lp.set_defaults(func=_cmd_list)
    fp = dsub.add_parser("fetch", help="download (or copy from a mirror) and verify by SHA-256")
    fp.add_argument("names", nargs="*", help="datasets (default: all)")
    fp.add_argument("--dest", help="destination (default: the configured data root)")
    fp.add_argument("--mirror", help="local copy to take files from (default: $CYTOAGENT_DATA_MIRROR)")
    fp.set_defaults(func=_cmd_fetch)
