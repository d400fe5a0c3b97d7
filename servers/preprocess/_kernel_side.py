"""Runs inside the sandbox kernel: exec one candidate in a fresh namespace on saved images.

Only numpy (and OpenCV for the candidate's convenience) are needed. The host validates the
outputs again; this side only turns the candidate's mistakes into readable messages.
"""

from __future__ import annotations

import numpy as np

FUNCTION = "preprocess_images"


class CandidateError(Exception):
    """The candidate code broke the preprocessing contract (message says how)."""


def run_candidate(code: str, in_path: str, out_path: str) -> str:
    """Exec ``code``, call ``preprocess_images`` on the images in ``in_path``, save to ``out_path``."""
    with np.load(in_path, allow_pickle=False) as z:
        images = [z[f"img{i}"] for i in range(len(z.files))]
    try:
        compiled = compile(code, "<candidate>", "exec")
    except SyntaxError as e:
        raise CandidateError(f"the code does not parse: {e.msg} (line {e.lineno}).") from None
    try:
        import cv2
    except ImportError:  # pragma: no cover - depends on the environment
        cv2 = None
    ns = {"__name__": "__candidate__", "np": np, "numpy": np, "cv2": cv2, "cv": cv2}
    exec(compiled, ns)
    fn = ns.get(FUNCTION)
    if not callable(fn):
        others = sorted(k for k, v in ns.items() if callable(v) and not k.startswith("_") and k not in
                        ("np", "numpy", "cv2", "cv"))
        raise CandidateError(f"the code does not define a function named {FUNCTION}(images)"
                             + (f" (it defines: {', '.join(others[:8])})" if others else "") + ".")
    out = fn([im.copy() for im in images])
    if isinstance(out, np.ndarray) and out.ndim >= 3 and out.shape[0] == len(images) and out.dtype != object:
        out = list(out)
    if not isinstance(out, list | tuple):
        raise CandidateError(f"{FUNCTION} returned {type(out).__name__}; return a list with one array per "
                             f"input image ({len(images)}).")
    if len(out) != len(images):
        raise CandidateError(f"{FUNCTION} returned {len(out)} images for {len(images)} inputs; return exactly one "
                             "per input, in order.")
    arrays = {}
    for i, a in enumerate(out):
        try:
            arr = np.asarray(a)
        except Exception as e:  # noqa: BLE001 - reported to the candidate's author
            raise CandidateError(f"output {i} is not an array ({type(a).__name__}): {e}") from None
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise CandidateError(f"output {i} has dtype {arr.dtype}; return real numeric arrays "
                                 "(float32 or uint8/uint16).")
        arrays[f"img{i}"] = arr
    np.savez(out_path, **arrays)
    return "ok"
