"""Brief training / fine-tuning of Cellpose and StarDist on local fluorescence nuclei.

Pretrained weights cannot be downloaded here, so these produce real weights in each backend's
own format from the shared training images (DSB2018 fluorescence samples + ``stardist_img2d``):

    images, labels = load_fluo_training_set(shared / "fluo_nuclei")
    path = train_cellpose(images, labels, out_dir, epochs=5)          # file, Cellpose format
    folder = train_stardist(images, labels, out_dir, epochs=2)        # folder, StarDist format

Both write to a temporary name and move the result into place only when training finished, so an
interrupted run leaves nothing half-written. The result loads with
``get_segmenter("cellpose"|"stardist", weights=path)``. A few epochs give plumbing-grade weights,
not accurate ones; pass ``base_weights`` to fine-tune a real model instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from servers.common.errors import ToolError
from servers.common.progress import ProgressFn


def load_fluo_training_set(root: str | Path, *, limit: int | None = None,
                           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fluorescence nuclei images (float32 (H, W)) and int32 instance labels under ``root``.

    ``root`` is a ``fluo_nuclei`` folder: ``dsb2018/<id>/`` samples (brightfield/stained ones with
    coloured pixels are skipped — this set is for fluorescence) and ``*.tif`` images that have a
    ``*.mask.tif`` label image beside them.
    """
    from servers.common.annotations import (
        list_dsb2018_samples,
        read_dsb2018_image,
        read_dsb2018_labels,
        read_label_image,
    )

    r = Path(root)
    if not r.is_dir():
        raise ToolError(f"Training folder not found: {r}.", hint="Pass a fluo_nuclei folder (dsb2018/ and/or *.tif + *.mask.tif).")
    images, labels = [], []
    for tif in sorted(r.glob("*.tif")):
        if tif.name.endswith(".mask.tif"):
            continue
        mask = tif.with_name(tif.name[:-4] + ".mask.tif")
        if mask.is_file():
            import tifffile

            images.append(np.asarray(tifffile.imread(tif), dtype=np.float32))
            labels.append(read_label_image(mask))
    dsb = r / "dsb2018" if (r / "dsb2018").is_dir() else r
    for s in list_dsb2018_samples(dsb) if any(dsb.glob("*/masks")) else []:
        rgb = read_dsb2018_image(s, grayscale=False)
        if rgb.ndim == 3 and np.abs(rgb.astype(int) - rgb[..., :1]).max() > 0:  # stained brightfield
            continue
        images.append((rgb[..., 0] if rgb.ndim == 3 else rgb).astype(np.float32))
        labels.append(read_dsb2018_labels(s))
    if limit:
        images, labels = images[:limit], labels[:limit]
    if not images:
        raise ToolError(f"No image/label pairs found under {r}.",
                        hint="Expected dsb2018/<id>/{images,masks}/ samples or *.tif with *.mask.tif.")
    return images, labels


def _check_pairs(images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> None:
    if len(images) != len(labels) or not images:
        raise ToolError(f"Got {len(images)} images and {len(labels)} label images.",
                        hint="Pass the same, non-zero number of each.")
    for i, (im, lb) in enumerate(zip(images, labels)):
        if im.shape[:2] != lb.shape:
            raise ToolError(f"Pair {i}: image {im.shape} and labels {lb.shape} differ in size.",
                            hint="Each label image must match its image's (H, W).")


def _device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished file/folder into place (replacing an older one of the same name)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, final)
    return final


def _write_meta(path: Path, meta: dict) -> None:
    from servers.common.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(meta, indent=2, default=str))


# --------------------------------------------------------------------------- Cellpose


def train_cellpose(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], out_dir: str | Path, *,
                   name: str = "cellpose_nuclei", epochs: int = 5, learning_rate: float = 0.1,
                   weight_decay: float = 1e-4, batch_size: int = 8, diam_mean: float = 17.0,
                   base_weights: str | Path | None = None, device: str = "auto",
                   progress: ProgressFn | None = None) -> Path:
    """Train (or fine-tune ``base_weights``) a Cellpose network; returns the saved weights file.

    The file is ``<out_dir>/<name>`` in Cellpose's own format (a torch state dict incl.
    ``diam_mean``); a ``<name>.json`` beside it records the training run.
    """
    _check_pairs(images, labels)
    if epochs < 1:
        raise ToolError(f"epochs={epochs} must be ≥ 1.", hint="Use e.g. 5 for a quick run.")
    try:
        import torch
        from cellpose import models
        from cellpose import train as cp_train
    except ImportError as e:
        raise ToolError(f"Cellpose is not installed ({e}).", hint="pip install 'cytoagent[cellpose]'.") from e
    from servers.common.segmenters.cellpose_backend import cellpose_major

    dev = _device(device)
    if base_weights is not None and not Path(base_weights).is_file():
        raise ToolError(f"Base weights not found: {base_weights}.", hint="Pass an existing Cellpose weights file or omit it.")
    model = models.CellposeModel(gpu=dev == "cuda", device=torch.device(dev),
                                 pretrained_model=str(base_weights) if base_weights else False, diam_mean=diam_mean)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    if progress:
        progress(0, epochs, "training Cellpose")
    t0 = time.time()
    try:
        kw = dict(train_data=[np.asarray(i, np.float32) for i in images],
                  train_labels=[np.asarray(lb, np.int32) for lb in labels],
                  n_epochs=int(epochs), learning_rate=learning_rate, weight_decay=weight_decay,
                  batch_size=batch_size, save_path=str(tmp), model_name=name, min_train_masks=1,
                  normalize=True)
        if cellpose_major() < 4:
            kw["channels"] = [0, 0]
        with contextlib.redirect_stdout(sys.stderr):
            saved = Path(cp_train.train_seg(model.net, **kw)[0])
        final = _publish(saved, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_meta(out / f"{name}.json", {"backend": "cellpose", "weights": str(final), "epochs": epochs,
                                        "n_images": len(images), "base_weights": base_weights,
                                        "diam_mean": diam_mean, "device": dev, "seconds": round(time.time() - t0, 1)})
    if progress:
        progress(epochs, epochs, "Cellpose trained")
    return final


# --------------------------------------------------------------------------- StarDist


def train_stardist(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], out_dir: str | Path, *,
                   name: str = "stardist_nuclei", epochs: int = 2, steps_per_epoch: int = 10,
                   n_rays: int = 32, grid: tuple[int, int] = (2, 2), patch_size: int = 128,
                   batch_size: int = 4, unet_n_depth: int = 2, val_fraction: float = 0.15,
                   optimize_thresholds: bool = True, base_weights: str | Path | None = None,
                   device: str = "auto", seed: int = 0, progress: ProgressFn | None = None) -> Path:
    """Train (or fine-tune the model folder ``base_weights``) a StarDist2D model; returns its folder.

    The folder ``<out_dir>/<name>`` holds ``config.json``, the Keras weights and (when
    ``optimize_thresholds``) ``thresholds.json`` tuned on the held-out images.
    """
    _check_pairs(images, labels)
    if epochs < 1 or steps_per_epoch < 1:
        raise ToolError("epochs and steps_per_epoch must be ≥ 1.", hint="Use e.g. epochs=2, steps_per_epoch=10.")
    try:
        from csbdeep.utils import normalize
        from stardist import fill_label_holes
        from stardist.models import Config2D, StarDist2D
    except ImportError as e:
        raise ToolError(f"StarDist is not installed ({e}).", hint="pip install 'cytoagent[stardist]'.") from e
    if device == "cpu":
        from servers.common.segmenters.stardist_backend import _configure_device

        _configure_device("cpu")
    X = [normalize(np.asarray(i, np.float32), 1, 99.8, axis=(0, 1)) for i in images]
    Y = [fill_label_holes(np.asarray(lb, np.int32)) for lb in labels]
    small = [i for i, x in enumerate(X) if min(x.shape) < patch_size]
    if small:
        raise ToolError(f"Images {small} are smaller than patch_size={patch_size}.", hint="Lower patch_size.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    n_val = max(1, int(round(val_fraction * len(X)))) if len(X) > 1 else 0
    val, trn = order[:n_val], order[n_val:] if n_val else order
    Xt, Yt = [X[i] for i in trn], [Y[i] for i in trn]
    Xv, Yv = ([X[i] for i in val], [Y[i] for i in val]) if n_val else (Xt, Yt)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_name = f".{name}-tmp-{os.getpid()}"
    shutil.rmtree(out / tmp_name, ignore_errors=True)
    if base_weights is not None and not (Path(base_weights) / "config.json").is_file():
        raise ToolError(f"{base_weights} is not a StarDist model folder.", hint="Pass a folder with config.json, or omit it.")
    if progress:
        progress(0, epochs, "training StarDist")
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Keras/StarDist print progress to stdout
            if base_weights is not None:
                shutil.copytree(Path(base_weights), out / tmp_name)
                model = StarDist2D(None, name=tmp_name, basedir=str(out))
                model.config.train_epochs, model.config.train_steps_per_epoch = epochs, steps_per_epoch
                model.config.train_tensorboard = False
            else:
                conf = Config2D(n_rays=n_rays, grid=tuple(grid), n_channel_in=1, train_patch_size=(patch_size, patch_size),
                                train_batch_size=batch_size, train_epochs=epochs, train_steps_per_epoch=steps_per_epoch,
                                unet_n_depth=unet_n_depth, use_gpu=False, train_tensorboard=False)
                model = StarDist2D(conf, name=tmp_name, basedir=str(out))
            model.train(Xt, Yt, validation_data=(Xv, Yv), epochs=epochs, steps_per_epoch=steps_per_epoch, seed=seed)
            if optimize_thresholds:
                model.optimize_thresholds(Xv, Yv, nms_threshs=[0.3, 0.4], iou_threshs=[0.5],
                                          predict_kwargs={"show_tile_progress": False},
                                          optimize_kwargs={"measure": "accuracy"})
            final = _publish(out / tmp_name, out / name)
    except BaseException:
        shutil.rmtree(out / tmp_name, ignore_errors=True)
        raise
    _write_meta(out / f"{name}.json", {"backend": "stardist", "weights": str(final), "epochs": epochs,
                                        "steps_per_epoch": steps_per_epoch, "n_train": len(Xt), "n_val": len(Xv),
                                        "base_weights": str(base_weights) if base_weights else None,
                                        "seconds": round(time.time() - t0, 1)})
    if progress:
        progress(epochs, epochs, "StarDist trained")
    return final
