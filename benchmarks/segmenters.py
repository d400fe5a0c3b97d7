"""Accuracy (AP@0.5, F1@0.5, AJI) and speed (images/s) of every available segmentation backend.

    python benchmarks/segmenters.py --quick            # < 1 minute
    python benchmarks/segmenters.py                    # all images
    python benchmarks/segmenters.py --cellpose-weights W --stardist-weights DIR

Datasets (../shared/data, real ground truth):
- ``fluo_nuclei``: ``stardist_img2d`` (125 nuclei) + the 12 DSB2018 samples (the two stained
  brightfield DSB images are segmented with ``modality="he"``, the rest as fluorescence);
- ``he_nuclei``: the 3 MoNuSeg 40× tiles (0.2525 µm/px), XML outlines rasterised.

Backends: ``classical`` always; ``unet`` (torch and onnx runtimes, bioimage.io weights) when its
weights are found; ``cellpose`` / ``stardist`` when the package imports and weights are found
(``--*-weights`` or the usual search, see servers/common/segmenters/weights.py). Backends that are
not available are listed under ``skipped`` with the reason.

Ratios in the same run: each backend's AP@0.5 and images/s relative to ``classical``; the U-Net's
torch vs ONNX runtime; and our sparse-IoU metrics against ``cellpose.metrics.average_precision``
(identical values required) when Cellpose is installed, else against a dense per-object loop.

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
MONUSEG_MPP = 0.2525


def load_datasets(root: Path, quick: bool) -> dict[str, list[dict]]:
    import tifffile

    from servers.common.annotations import (
        imagescope_to_labels,
        list_dsb2018_samples,
        read_dsb2018_image,
        read_dsb2018_labels,
        read_label_image,
    )

    fluo = [{"name": "stardist_img2d", "modality": "fluorescence", "mpp": None,
             "image": tifffile.imread(root / "fluo_nuclei" / "stardist_img2d.tif"),
             "gt": read_label_image(root / "fluo_nuclei" / "stardist_img2d.mask.tif")}]
    samples = list_dsb2018_samples(root / "fluo_nuclei" / "dsb2018")
    for s in samples[:4] if quick else samples:
        rgb = read_dsb2018_image(s, grayscale=False)
        stained = rgb.ndim == 3 and np.abs(rgb.astype(int) - rgb[..., :1]).max() > 0
        fluo.append({"name": s.name[:12], "modality": "he" if stained else "fluorescence", "mpp": None,
                     "image": rgb if stained else rgb[..., 0], "gt": read_dsb2018_labels(s)})
    he = []
    tiles = sorted((root / "he_nuclei").glob("TCGA-*.tif"))
    for t in tiles[:1] if quick else tiles:
        img = tifffile.imread(t)
        he.append({"name": t.stem, "modality": "he", "mpp": MONUSEG_MPP, "image": img,
                   "gt": imagescope_to_labels(t.with_suffix(".xml"), img.shape)})
    return {"fluo_nuclei": fluo, "he_nuclei": he}


def backend_configs(args) -> tuple[dict[str, dict], dict[str, str]]:
    """name → options for get_segmenter, and name → reason for each skipped backend."""
    from servers.common.errors import ToolError
    from servers.common.segmenters import available_backends
    from servers.common.segmenters.weights import find_weights

    avail = available_backends()
    configs: dict[str, dict] = {"classical": {"backend": "classical"}}
    skipped: dict[str, str] = {}
    wanted = {"unet": args.unet_weights, "cellpose": args.cellpose_weights, "stardist": args.stardist_weights}
    for name, weights in wanted.items():
        if avail[name]["status"] != "ready":
            skipped[name] = avail[name]["status"]
            continue
        try:
            path = find_weights(name, weights)
        except ToolError as e:
            skipped[name] = str(e).split(" Looked in")[0]
            continue
        if name == "unet":
            configs["unet_torch"] = {"backend": "unet", "weights": str(path), "runtime": "torch"}
            configs["unet_onnx"] = {"backend": "unet", "weights": str(path), "runtime": "onnx"}
        else:
            configs[name] = {"backend": name, "weights": str(path)}
    return configs, skipped


def run_backend(opts: dict, items: list[dict]) -> dict:
    from servers.common.metrics import segmentation_scores
    from servers.common.segmenters import get_segmenter

    opts = dict(opts)
    backend = opts.pop("backend")
    segs = {m: get_segmenter(backend, modality=m, device="cpu", **opts) for m in ("fluorescence", "he")}
    # warm-up (model load, JIT) on a small crop so timings are steady-state
    for it in items[:1]:
        segs[it["modality"]].segment(it["image"][:128, :128], mpp=it["mpp"])
    ap, f1, aji, per = [], [], [], []
    seconds = 0.0
    for it in items:
        t0 = time.perf_counter()
        labels = segs[it["modality"]].segment(it["image"], mpp=it["mpp"])
        seconds += time.perf_counter() - t0
        s = segmentation_scores(it["gt"], labels, thresholds=(0.5,))
        ap.append(s["ap"]["0.5"])
        f1.append(s["f1"]["0.5"])
        aji.append(s["aji"])
        per.append({"image": it["name"], "n_gt": s["n_gt"], "n_pred": s["n_pred"], "ap50": round(s["ap"]["0.5"], 4)})
    return {"ap50": float(np.mean(ap)), "f1_50": float(np.mean(f1)), "aji": float(np.mean(aji)),
            "images_per_s": len(items) / seconds, "megapixels_per_s": sum(i["gt"].size for i in items) / seconds / 1e6,
            "n_images": len(items), "per_image": per}


def metrics_reference(items: list[dict], preds: list[np.ndarray]) -> dict:
    """Our AP against Cellpose's (same definition) or a dense per-object loop, values and speed."""
    from servers.common.metrics import average_precision

    gts = [i["gt"] for i in items]
    t0 = time.perf_counter()
    ours = [average_precision(g, p, (0.5, 0.75, 0.9)) for g, p in zip(gts, preds)]
    t_ours = time.perf_counter() - t0
    try:
        from cellpose import metrics as cpm
        from skimage.segmentation import relabel_sequential

        seq = [relabel_sequential(p)[0] for p in preds]  # Cellpose counts objects as labels.max()
        t0 = time.perf_counter()
        ref = cpm.average_precision(gts, seq, threshold=[0.5, 0.75, 0.9])[0]
        t_ref = time.perf_counter() - t0
        name = "cellpose.metrics.average_precision"
        ref_ap = [dict(zip((0.5, 0.75, 0.9), map(float, r))) for r in ref]
    except ImportError:
        name = "dense per-object IoU loop + scipy linear_sum_assignment"
        t0 = time.perf_counter()
        ref_ap = [_dense_ap(g, p) for g, p in zip(gts, preds)]
        t_ref = time.perf_counter() - t0
    diff = max(abs(o[t] - r[t]) for o, r in zip(ours, ref_ap) for t in (0.5, 0.75, 0.9))
    return {"reference": name, "max_abs_ap_diff": diff, "ours_s": t_ours, "reference_s": t_ref,
            "speedup_vs_reference": t_ref / t_ours}


def _dense_ap(gt: np.ndarray, pred: np.ndarray) -> dict:
    from scipy.optimize import linear_sum_assignment

    g_ids = [i for i in np.unique(gt) if i]
    p_ids = [i for i in np.unique(pred) if i]
    iou = np.zeros((len(g_ids), len(p_ids)))
    for a, gi in enumerate(g_ids):
        gm = gt == gi
        for b in np.unique(pred[gm]):
            if b:
                pm = pred == b
                iou[a, p_ids.index(b)] = (gm & pm).sum() / (gm | pm).sum()
    out = {}
    for t in (0.5, 0.75, 0.9):
        n_min = max(1, min(iou.shape))
        cost = -(iou >= t).astype(float) - iou / (2 * n_min)
        r, c = linear_sum_assignment(cost) if iou.size else (np.array([], int), np.array([], int))
        tp = int((iou[r, c] >= t).sum())
        den = tp + (len(p_ids) - tp) + (len(g_ids) - tp)
        out[t] = tp / den if den else 1.0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 fluorescence images + 1 H&E tile (< 1 minute)")
    p.add_argument("--data", default=str(SHARED))
    p.add_argument("--unet-weights", default=None)
    p.add_argument("--cellpose-weights", default=None)
    p.add_argument("--stardist-weights", default=None)
    args = p.parse_args(argv)
    root = Path(args.data)
    if not (root / "fluo_nuclei").is_dir():
        print(json.dumps({"error": f"shared data not found at {root}"}))
        return 1
    import os

    os.environ.setdefault("CYTOAGENT_DATA_ROOT", str(root))
    if args.unet_weights is None and not os.environ.get("CYTOAGENT_UNET_WEIGHTS"):
        args.unet_weights = str(root / "models" / "unet2d_nuclei_broad")

    t_start = time.perf_counter()
    data = load_datasets(root, args.quick)
    configs, skipped = backend_configs(args)
    results: dict[str, dict] = {}
    for name, opts in configs.items():
        for ds, items in data.items():
            try:
                r = run_backend(opts, items)
            except Exception as e:  # one failing backend must not hide the others
                skipped[f"{name}/{ds}"] = f"{type(e).__name__}: {e}"
                continue
            results.setdefault(name, {})[ds] = r
            print(f"{name:12s} {ds:12s} AP@0.5={r['ap50']:.3f} F1={r['f1_50']:.3f} AJI={r['aji']:.3f} "
                  f"{r['images_per_s']:.2f} img/s ({r['n_images']} images)", file=sys.stderr)

    ratios = {}
    base = results.get("classical", {})
    for name, per_ds in results.items():
        for ds, r in per_ds.items():
            if name != "classical" and ds in base:
                ratios[f"{name}/{ds}"] = {"ap50_vs_classical": r["ap50"] / max(base[ds]["ap50"], 1e-9),
                                          "speed_vs_classical": r["images_per_s"] / base[ds]["images_per_s"]}
    if "unet_torch" in results and "unet_onnx" in results:
        for ds in results["unet_torch"]:
            ratios[f"unet_torch_vs_onnx/{ds}"] = {
                "speed": results["unet_torch"][ds]["images_per_s"] / results["unet_onnx"][ds]["images_per_s"]}

    from servers.common.segmenters import get_segmenter

    fl = data["fluo_nuclei"]
    cls = {m: get_segmenter("classical", modality=m) for m in ("fluorescence", "he")}
    preds = [cls[i["modality"]].segment(i["image"], mpp=i["mpp"]) for i in fl]
    mref = metrics_reference(fl, preds)

    table = {name: {ds: {k: round(v, 4) for k, v in r.items() if k != "per_image"} for ds, r in per.items()}
             for name, per in results.items()}
    for name, per in table.items():
        for ds, r in per.items():
            print(f"| {name} | {ds} | {r['ap50']:.3f} | {r['f1_50']:.3f} | {r['aji']:.3f} | {r['images_per_s']:.2f} |",
                  file=sys.stderr)
    out = {"quick": args.quick, "results": table,
           "ratios": {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in ratios.items()},
           "metrics_vs_reference": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in mref.items()},
           "skipped": skipped, "seconds": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
