"""Candidate evaluations per minute on the spot task (sandboxed, parallel), with reference ratios.

    python benchmarks/preprocess.py --quick        # < 1 minute
    python benchmarks/preprocess.py --task smfish --n 600 --workers 2

Measures, in one run:
- ``evals_per_min``: random 2–4-primitive candidates evaluated end to end (sandbox exec, output
  validation, LoG detector, F1, bank write) through the executor with ``--workers`` processes;
  compared with the agentic-superoptimisation paper's Polaris rate (1,200 evaluations in ~12.5 h);
- ``inprocess_evals_per_min``: the same candidates applied directly in this process without the
  sandbox (the cost of isolation is the ratio of the two, per worker);
- the LoG detector's local-maximum step against ``skimage.feature.peak_local_max`` on the same
  responses (identical peaks required; speed ratio reported).

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAPER_EVALS_PER_MIN = 1200 / (12.5 * 60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 1 minute)")
    ap.add_argument("--task", default=None, help="default: smfish when the shared data is there, else spots_synthetic")
    ap.add_argument("--n", type=int, default=None, help="candidate evaluations (default 600, --quick 150)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.n or (150 if args.quick else 600)

    tmp = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    os.environ.setdefault("CYTOAGENT_DATA_ROOT", str(shared if shared.is_dir() else tmp / "data"))
    Path(os.environ["CYTOAGENT_DATA_ROOT"]).mkdir(parents=True, exist_ok=True)
    os.environ["CYTOAGENT_WORKSPACE"] = str(tmp / "ws")
    os.environ["CYTOAGENT_CONFIG"] = str(tmp / "none.toml")

    import numpy as np
    import optuna

    from evals.optimize.loop import Evaluator
    from servers.preprocess.bank import Bank
    from servers.preprocess.evaluate import code_hash
    from servers.preprocess.primitives import apply_pipeline, pipeline_code, suggest_pipeline
    from servers.preprocess.tasks import get_task

    task_name = args.task or ("smfish" if get_task("smfish").available()[0] else "spots_synthetic")
    task = get_task(task_name)
    samples = task.samples("val")

    # candidates: random pipelines from the AutoML search space
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=args.seed))
    pipelines, codes = [], {}
    while len(codes) < n:
        steps = suggest_pipeline(study.ask())
        c = pipeline_code(steps, header=f"bench {len(codes)}")
        codes[code_hash(c)] = c
        pipelines.append(steps)

    # 1) end to end, sandboxed, parallel
    bank = Bank(tmp / "bank.sqlite")
    ev = Evaluator(task, bank, workers=args.workers, timeout_s=60)
    t0 = time.perf_counter()
    warm = dict(list(codes.items())[: args.workers * 2])  # start the pool and the kernels
    ev.run(warm, "val", "bench")
    t_warm = time.perf_counter() - t0
    rest = {h: c for h, c in codes.items() if h not in warm}
    t1 = time.perf_counter()
    results = ev.run(rest, "val", "bench")
    t_rest = time.perf_counter() - t1
    ev.close()
    statuses: dict[str, int] = {}
    for r in results.values():
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    evals_per_min = 60 * len(rest) / t_rest
    evals_per_min_cold = 60 * len(codes) / (t_warm + t_rest)

    # 2) the same work in-process, no sandbox, one core
    ds = task.make_downstream()
    m = min(len(pipelines), 60 if args.quick else 200)
    t2 = time.perf_counter()
    for steps in pipelines[:m]:
        preds = [ds.run(apply_pipeline(s.image, steps)) for s in samples]
        ds.score(preds, [s.truth for s in samples])
    inproc_per_min = 60 * m / (time.perf_counter() - t2)

    # 3) local maxima: ours (maximum filter) vs skimage.peak_local_max on identical responses
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    from servers.preprocess.downstream import detect_spots_log

    st = ds.settings
    inputs = [s.image.astype(np.float32) for s in samples]
    inputs += [apply_pipeline(s.image, [("minmax_normalize", {})]) for s in samples]
    identical = True
    t_ours = t_ref = 0.0
    for img in inputs:
        ta = time.perf_counter()
        ours = detect_spots_log(img, sigma=st["sigma"], threshold=st["threshold"], min_distance=st["min_distance"])
        tb = time.perf_counter()
        resp = -(st["sigma"] ** 2) * ndi.gaussian_laplace(img, st["sigma"])
        ref = peak_local_max(resp, min_distance=st["min_distance"], threshold_abs=st["threshold"], exclude_border=0)
        tc = time.perf_counter()
        t_ours += tb - ta
        t_ref += tc - tb
        identical &= {tuple(p) for p in ours} == {tuple(map(float, p)) for p in ref}

    out = {
        "benchmark": "preprocess", "task": task.name, "val_images": len(samples), "candidates": len(codes),
        "workers": args.workers, "cpu_count": os.cpu_count(), "isolation": next(
            (r.get("isolation") for r in results.values() if r.get("isolation")), None),
        "statuses": statuses, "evals_per_min": round(evals_per_min, 1),
        "evals_per_min_including_startup": round(evals_per_min_cold, 1), "startup_s": round(t_warm, 2),
        "target_evals_per_min": 100, "meets_target": evals_per_min >= 100,
        "paper_polaris_evals_per_min": round(PAPER_EVALS_PER_MIN, 2),
        "ratio_vs_paper": round(evals_per_min / PAPER_EVALS_PER_MIN, 1),
        "inprocess_evals_per_min_1core": round(inproc_per_min, 1),
        "ratio_sandboxed_parallel_vs_inprocess": round(evals_per_min / inproc_per_min, 2),
        "detector_peaks_identical_to_skimage": bool(identical),
        "detector_speedup_vs_skimage_peak_local_max": round(t_ref / max(t_ours, 1e-9), 2),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
