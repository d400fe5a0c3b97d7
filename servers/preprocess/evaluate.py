"""Score a candidate ``preprocess_images`` function on a task split.

1. The code runs in the sandbox (``servers.sandbox.kernel.Kernel``: a warm, isolated, time- and
   memory-limited kernel per process). The kernel sees a private scratch workspace, the task's input
   images (``.npz``) read-only, and an empty data root, so ground truth is out of its reach; each
   candidate is exec'd in a fresh namespace.
2. The host re-reads the outputs and validates them (count, shape, channels, dtype, finite values).
3. The fixed downstream tool runs on every output and the task metric scores it.

Every way a candidate can fail (no function, syntax error, exception, wrong shape/dtype, NaN,
timeout, a killed kernel, an escape attempt stopped by the sandbox) becomes an :class:`Evaluation`
with ``status != "ok"``, ``score = 0.0`` (the metric's minimum) and a readable ``error``; nothing
raises into the caller except invalid *arguments* (unknown split, empty code), which are ToolErrors.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from servers.common.errors import ToolError
from servers.preprocess.tasks import SPLITS, Task

DEFAULT_TIMEOUT_S = 60.0
MAX_CODE_CHARS = 100_000
STATUSES = ("ok", "error", "invalid", "timeout", "crashed")


def code_hash(code: str) -> str:
    """Stable id of a function's source (trailing whitespace ignored)."""
    norm = "\n".join(line.rstrip() for line in code.strip().splitlines())
    return hashlib.sha256(norm.encode()).hexdigest()[:16]


@dataclass
class Evaluation:
    """Result of one candidate on one split."""

    task: str
    split: str
    code_hash: str
    status: str
    score: float
    metric: str
    n_images: int = 0
    per_image: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    duration_s: float = 0.0
    sandbox_s: float = 0.0
    downstream_s: float = 0.0
    isolation: str | None = None
    outputs: list[np.ndarray] | None = field(default=None, repr=False)
    predictions: list[np.ndarray] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self, *, per_image: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d.pop("outputs")
        d.pop("predictions")
        if not per_image:
            d.pop("per_image")
        return d


class CandidateInvalid(Exception):
    """The candidate's outputs break the contract (message says how to fix it)."""


# -- the sandbox runner -----------------------------------------------------------------------
class SandboxRunner:
    """A warm sandbox kernel that runs candidates on saved input images.

    The kernel's read-write workspace is a private folder of this runner (outputs only); the input
    images live in a shared folder mounted **read-only** into the kernel, and its data root is an
    empty folder, so a candidate can neither read ground truth nor tamper with other evaluations.

    Args:
        root: Where inputs and scratch folders live (default ``<workspace>/preprocess/sandbox``).
        memory_mb: Address-space limit of the kernel.
        reset_every: Restart the kernel after this many candidates (limits state leaking between them).
    """

    def __init__(self, root: str | os.PathLike | None = None, *, memory_mb: int = 3072, reset_every: int = 200):
        import secrets

        from servers.common.config import get_config

        self.root = Path(root or Path(get_config().workspace) / "preprocess" / "sandbox").resolve()
        self.inputs_dir = self.root / "inputs"
        self.scratch = self.root / "scratch" / f"{os.getpid()}-{secrets.token_hex(4)}"
        for d in (self.inputs_dir, self.scratch / "out", self.root / "no-data"):
            d.mkdir(parents=True, exist_ok=True)
        self.memory_mb = memory_mb
        self.reset_every = reset_every
        self._kernel = None
        self._n = 0
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._digests: dict[str, str] = {}

    def _get_kernel(self):
        if self._kernel is None or not self._kernel.alive:
            try:
                from servers.sandbox.kernel import Kernel, SandboxPolicy
            except ImportError as e:  # pragma: no cover - the sandbox ships with the project
                raise ToolError(f"The sandbox is not available ({e}); candidate code is never run unsandboxed.",
                                hint="Install the project completely (servers/sandbox).") from e
            policy = SandboxPolicy(memory_mb=self.memory_mb, threads=1, max_processes=16, max_output_chars=4000,
                                   max_figures=0)
            self._kernel = Kernel(policy=policy, workspace=self.scratch, data_root=self.root / "no-data",
                                  extra_ro_paths=[self.inputs_dir], track_files=False,
                                  preload=["numpy", "cv2", "servers.preprocess._kernel_side"])
            self._n = 0
        return self._kernel

    @property
    def isolation(self) -> str | None:
        return self._kernel.isolation if self._kernel is not None else None

    def inputs_file(self, key: str, images: list[np.ndarray]) -> Path:
        """The kernel-visible (read-only) ``.npz`` of ``images``, named by a digest of their content."""
        from servers.common.atomic import atomic_path

        digest = self._digests.get(key)
        if digest is None:
            h = hashlib.sha1()
            for im in images:
                a = np.ascontiguousarray(im)
                h.update(f"{a.shape}{a.dtype}".encode())
                h.update(a.tobytes())
            digest = self._digests[key] = h.hexdigest()[:16]
        p = self.inputs_dir / f"{key}-{digest}.npz"
        if not p.is_file():
            with atomic_path(p) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **{f"img{i}": np.ascontiguousarray(im) for i, im in enumerate(images)})
        return p

    def run(self, code: str, inputs: Path, timeout_s: float) -> tuple[str, list[np.ndarray] | None, str | None, float]:
        """(status, outputs, error, seconds) of running ``code`` on the images in ``inputs``."""
        with self._lock:
            k = self._get_kernel()
            out = self.scratch / "out" / f"{os.getpid()}-{next(self._counter)}.npz"
            call = ("import servers.preprocess._kernel_side as _cyto_ks\n"
                    f"_cyto_ks.run_candidate({code!r}, {str(inputs)!r}, {str(out)!r})")
            t0 = time.perf_counter()
            res = k.execute(call, timeout_s=timeout_s)
            dt = time.perf_counter() - t0
            self._n += 1
            if self._n >= self.reset_every:
                k.reset()
                self._n = 0
        try:
            if not res.ok:
                status = {"Timeout": "timeout", "KernelDied": "crashed"}.get(res.error_type or "", "error")
                return status, None, _clean_error(res.error or res.error_type or "unknown error", status), dt
            if not out.is_file():
                return "error", None, "the sandbox produced no output file", dt
            with np.load(out, allow_pickle=False) as z:
                n = len(z.files)
                arrays = [z[f"img{i}"] for i in range(n)]
            return "ok", arrays, None, dt
        except (OSError, ValueError, KeyError) as e:
            return "invalid", None, f"the outputs could not be read back: {e}", dt
        finally:
            out.unlink(missing_ok=True)

    def close(self) -> None:
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)


def _clean_error(err: str, status: str) -> str:
    """The candidate-relevant part of a kernel traceback (the harness's own frames dropped)."""
    lines = err.strip().splitlines()
    first = next((i for i, line in enumerate(lines) if "<candidate>" in line), None)
    if first is not None:
        lines = ["Traceback (most recent call last):", *lines[first:]]
    else:  # no candidate frame: the exception line(s) only
        last_frame = max((i for i, line in enumerate(lines) if line.lstrip().startswith("File ")), default=-1)
        body = [ln for ln in lines[last_frame + 1:] if not ln.lstrip().startswith(("^", "_cyto_ks.", "raise "))]
        lines = body or lines[-2:]
    text = "\n".join(lines).replace("servers.preprocess._kernel_side.CandidateError: ", "")
    text = text.replace("CandidateError: ", "")
    if len(text) > 3000:
        text = text[:1200] + "\n...\n" + text[-1600:]
    prefix = {"timeout": "Timed out: ", "crashed": "The sandbox kernel died: "}.get(status, "")
    return prefix + text


_RUNNERS: dict[str, SandboxRunner] = {}
_RUNNERS_LOCK = threading.Lock()


def get_runner() -> SandboxRunner:
    """This process's warm runner for the configured workspace."""
    from servers.common.config import get_config

    key = str(get_config().workspace)
    with _RUNNERS_LOCK:
        r = _RUNNERS.get(key)
        if r is None:
            r = _RUNNERS[key] = SandboxRunner()
        return r


def close_runners() -> None:
    with _RUNNERS_LOCK:
        for r in _RUNNERS.values():
            r.close()
        _RUNNERS.clear()


# -- validation -------------------------------------------------------------------------------
def validate_outputs(task: Task, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> list[np.ndarray]:
    """Outputs converted for the downstream tool; raise CandidateInvalid naming what is wrong."""
    if len(outputs) != len(inputs):
        raise CandidateInvalid(f"returned {len(outputs)} images for {len(inputs)} inputs; return one per input.")
    ready = []
    for i, (x, y) in enumerate(zip(inputs, outputs)):
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise CandidateInvalid(f"output {i} has dtype {y.dtype}; return float32 or uint8/uint16 arrays.")
        if y.ndim == 3 and y.shape[2] == 1:
            y = y[..., 0]
        if y.shape[:2] != x.shape[:2]:
            raise CandidateInvalid(f"output {i} has shape {y.shape}, input {x.shape}: keep the height and width "
                                   "(no resizing, cropping or transposing).")
        want = x.shape[2] if x.ndim == 3 else None
        got = y.shape[2] if y.ndim == 3 else None
        if y.ndim not in (2, 3) or want != got:
            raise CandidateInvalid(f"output {i} has shape {y.shape}, input {x.shape}: keep the channel layout "
                                   f"({'(H, W)' if want is None else f'(H, W, {want})'}).")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            bad = int((~np.isfinite(y)).sum())
            raise CandidateInvalid(f"output {i} has {bad} NaN/infinite pixels; guard divisions (e.g. add 1e-6) "
                                   "and clip.")
        if task.rgb:
            yf = y.astype(np.float32)
            if y.dtype != np.uint8:
                scale = 255.0 if float(yf.max(initial=0.0)) <= 1.0 + 1e-6 else 1.0
                y = np.clip(yf * scale, 0, 255).round().astype(np.uint8)
            ready.append(np.ascontiguousarray(y))
        else:
            ready.append(np.ascontiguousarray(y, dtype=np.float32))
    return ready


# -- evaluation -------------------------------------------------------------------------------
def _check_args(code: str, split: str) -> None:
    if split not in SPLITS:
        raise ToolError(f"Unknown split {split!r}.", hint="Use 'val' (optimise on it) or 'test' (final check).")
    if not isinstance(code, str) or not code.strip():
        raise ToolError("The code is empty.", hint="Pass Python source defining preprocess_images(images).")
    if len(code) > MAX_CODE_CHARS:
        raise ToolError(f"The code has {len(code)} characters (limit {MAX_CODE_CHARS}).",
                        hint="Write a shorter function.")


def evaluate_code(task: Task, code: str, split: str = "val", *, timeout_s: float = DEFAULT_TIMEOUT_S,
                  keep_outputs: bool = False, runner: SandboxRunner | None = None) -> Evaluation:
    """Run ``code`` in the sandbox on ``split`` of ``task``, validate, run the downstream tool, score."""
    _check_args(code, split)
    t0 = time.perf_counter()
    h = code_hash(code)
    samples = task.samples(split)
    inputs = [s.image for s in samples]
    ev = Evaluation(task.name, split, h, "ok", 0.0, task.metric, n_images=len(samples))
    runner = runner or get_runner()
    status, outputs, error, ev.sandbox_s = runner.run(code, runner.inputs_file(f"{task.fingerprint}-{split}", inputs),
                                                      float(timeout_s))
    ev.isolation = runner.isolation
    if status == "ok":
        try:
            ready = validate_outputs(task, inputs, outputs or [])
        except CandidateInvalid as e:
            status, error = "invalid", f"Invalid output: {e}"
    if status != "ok":
        ev.status, ev.error, ev.duration_s = status, error, time.perf_counter() - t0
        return ev
    t1 = time.perf_counter()
    ds = task.make_downstream()
    preds = [ds.run(im) for im in ready]
    ev.score, ev.per_image = ds.score(preds, [s.truth for s in samples], [s.id for s in samples])
    ev.score = float(ev.score)
    ev.downstream_s = time.perf_counter() - t1
    if keep_outputs:
        ev.outputs, ev.predictions = ready, preds
    ev.duration_s = time.perf_counter() - t0
    return ev


def evaluate_job(job: dict[str, Any]) -> dict[str, Any]:
    """Executor entry point (picklable): ``{"task": Task.to_dict(), "code", "split", "timeout_s"}`` →
    ``Evaluation.to_dict()`` plus ``job_id``. Runs in worker processes with their own warm kernel."""
    env = job.get("env") or {}
    if env and any(os.environ.get(k) != v for k, v in env.items()):
        from servers.common.config import reset_config

        os.environ.update(env)
        reset_config()
    task = Task.from_dict(job["task"])
    try:
        ev = evaluate_code(task, job["code"], job.get("split", "val"),
                           timeout_s=float(job.get("timeout_s", DEFAULT_TIMEOUT_S)))
        out = ev.to_dict()
    except ToolError as e:
        out = Evaluation(task.name, job.get("split", "val"), code_hash(job.get("code") or ""), "error", 0.0,
                         task.metric, error=str(e)).to_dict()
    out["job_id"] = job.get("job_id")
    return out


def evaluation_preview(task: Task, ev: Evaluation, max_images: int = 3) -> bytes | None:
    """PNG: the first processed images with detections (spots) or outlines (nuclei), side by side."""
    if not ev.ok or not ev.outputs:
        return None
    from servers.common.images import boundaries, png_bytes, to_uint8

    tiles = []
    samples = task.samples(ev.split)
    for img, pred, s in list(zip(ev.outputs, ev.predictions or [], samples))[:max_images]:
        rgb = to_uint8(img) if img.ndim == 3 else np.repeat(to_uint8(img)[..., None], 3, axis=2)
        rgb = rgb.copy()
        if task.kind == "spots":
            for r, c in np.round(s.truth).astype(int):
                rgb[max(r - 3, 0):r + 4, min(max(c, 0), rgb.shape[1] - 1)] = (0, 255, 0)
            for r, c in np.round(pred).astype(int):
                rgb[r, max(c - 3, 0):c + 4] = (255, 0, 255)
        else:
            rgb[boundaries(pred)] = (255, 255, 0)
        tiles.append(rgb)
    # small tiles (the smFISH task uses ~110 px tiles) are enlarged so a person can see the marks
    k = max(1, 300 // max(t.shape[0] for t in tiles))
    if k > 1:
        tiles = [t.repeat(k, axis=0).repeat(k, axis=1) for t in tiles]
    h = max(t.shape[0] for t in tiles)
    canvas = np.zeros((h, sum(t.shape[1] for t in tiles) + 4 * (len(tiles) - 1), 3), np.uint8)
    x = 0
    for t in tiles:
        canvas[: t.shape[0], x: x + t.shape[1]] = t
        x += t.shape[1] + 4
    return png_bytes(canvas)
