"""bioimage.io 2D U-Net ("unet2d_nuclei_broad") nucleus segmenter: probabilities → seeded watershed.

The network is the bioimage.io example ``UNet2d`` (3 levels, 16-32-64-128 features, bilinear
upsampling); :func:`build_unet2d` re-implements that architecture so its weights load here without
any code from the model package. Weights may be

* a PyTorch state dict (``.pt``/``.pth``, loaded with ``weights_only=True``),
* a TorchScript archive (bioimage.io ``weights.pt``): its state dict is loaded into our module,
* an ONNX file (``weights.onnx``), run with onnxruntime alone — no torch needed,
* the model folder (``weights.pt`` preferred, else ``weights.onnx``).

Pre-processing follows the model's ``bioimageio.yaml``: per-image zero-mean unit-variance over
(y, x); post-processing: sigmoid → foreground probability. Large images are predicted in tiles of
``tile`` px with a ``halo`` px margin (the model's declared halo is 32). With two output channels
(e.g. a model trained by ``train_unet``) channel 1 is a boundary probability for the watershed.

    seg = get_segmenter("unet", weights="/path/unet2d_nuclei_broad", modality="fluorescence")
    labels = seg.segment(img)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from servers.common.errors import ToolError
from servers.common.segmenters.base import Segmenter
from servers.common.segmenters.postprocess import (
    nuclear_channel,
    rescale_for_model,
    resize_to,
    seeded_watershed,
)
from servers.common.segmenters.weights import find_weights

EPS = 1e-6  # bioimage.io zero_mean_unit_variance default


# --------------------------------------------------------------------------- architecture


@lru_cache(maxsize=1)
def _unet_classes():
    import torch
    from torch import nn

    class Upsample(nn.Module):
        def __init__(self, scale_factor: float, mode: str = "bilinear"):
            super().__init__()
            self.scale_factor = float(scale_factor)
            self.mode = mode

        def forward(self, x):
            return nn.functional.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=False)

    def conv_layer(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))

    class UNet2d(nn.Module):
        """Same layout (and state-dict keys) as bioimage.io's ``unet2d.py``."""

        def __init__(self, input_channels: int = 1, output_channels: int = 1):
            super().__init__()
            self.input_channels = input_channels
            self.output_channels = output_channels
            self.encoders = nn.ModuleList([conv_layer(input_channels, 16), conv_layer(16, 32), conv_layer(32, 64)])
            self.downsamplers = nn.ModuleList([nn.MaxPool2d(2)] * 3)
            self.base = conv_layer(64, 128)
            self.decoders = nn.ModuleList([conv_layer(128, 64), conv_layer(64, 32), conv_layer(32, 16)])
            self.upsamplers = nn.ModuleList([nn.Sequential(Upsample(2), nn.Conv2d(a, b, 1))
                                             for a, b in ((128, 64), (64, 32), (32, 16))])
            self.output = nn.Conv2d(16, output_channels, 1)

        def forward(self, x):
            skips = []
            for enc, down in zip(self.encoders, self.downsamplers):
                x = enc(x)
                skips.append(x)
                x = down(x)
            x = self.base(x)
            for i, (dec, up) in enumerate(zip(self.decoders, self.upsamplers), start=1):
                x = dec(torch.cat([skips[-i], up(x)], dim=1))
            return self.output(x)

    return UNet2d


def build_unet2d(input_channels: int = 1, output_channels: int = 1):
    """A fresh (untrained) bioimage.io-layout ``UNet2d`` torch module."""
    return _unet_classes()(input_channels, output_channels)


def load_state_dict(path: str | Path) -> dict:
    """The state dict of a weights file: plain state dict, checkpoint dict, or TorchScript archive."""
    import torch

    p = Path(path)
    try:
        if _is_torchscript(p):  # bioimage.io weights.pt: take the parameters, not the scripted code
            obj = {k: v for k, v in torch.jit.load(str(p), map_location="cpu").state_dict().items()}
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ToolError(f"{p.name} is neither a PyTorch state dict nor a TorchScript file ({e}).",
                        hint="Pass the U-Net's weights.pt / state-dict .pth, or weights.onnx.") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or "output.weight" not in obj:
        raise ToolError(f"{p.name} does not hold UNet2d weights (no 'output.weight' tensor).",
                        hint="Pass weights of the bioimage.io unet2d_nuclei_broad architecture.")
    return obj


def _is_torchscript(p: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def load_torch_unet(path: str | Path, device: str = "cpu"):
    """Our ``UNet2d`` with the weights at ``path``, in eval mode on ``device``."""
    sd = load_state_dict(path)
    cin = int(sd["encoders.0.0.weight"].shape[1])
    cout = int(sd["output.weight"].shape[0])
    net = build_unet2d(cin, cout)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ToolError(f"{Path(path).name} does not match the UNet2d architecture: {e}.",
                        hint="Pass weights of the bioimage.io unet2d_nuclei_broad architecture.") from e
    return net.eval().to(device)


# --------------------------------------------------------------------------- inference


def normalize(image: np.ndarray) -> np.ndarray:
    """Zero-mean unit-variance over the whole image (bioimage.io ``zero_mean_unit_variance``)."""
    x = np.asarray(image, dtype=np.float32)
    return ((x - x.mean()) / (x.std() + EPS)).astype(np.float32)


def _starts(n: int, tile: int, step: int) -> list[int]:
    if n <= tile:
        return [0]
    s = list(range(0, n - tile, step))
    return s + [n - tile]


def tiled_predict(image: np.ndarray, fn, *, tile: int, halo: int, batch_size: int = 4,
                  divisor: int = 8, progress=None) -> np.ndarray:
    """Run ``fn`` ((B, 1, t, t) float32 → (B, C, t, t)) over ``image`` in overlapping tiles.

    Images smaller than a tile are reflect-padded to a full tile. Each tile keeps only its centre
    (``halo`` px dropped on sides that touch another tile). Returns (C, H, W).
    """
    h, w = image.shape
    tile = max(divisor, (tile // divisor) * divisor)
    th, tw = min(tile, -(-h // divisor) * divisor), min(tile, -(-w // divisor) * divisor)
    ph, pw = max(0, th - h), max(0, tw - w)
    img = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="reflect") if ph or pw else image
    H, W = img.shape
    ys = _starts(H, th, max(1, th - 2 * halo))
    xs = _starts(W, tw, max(1, tw - 2 * halo))
    coords = [(y, x) for y in ys for x in xs]
    out = None
    for b0 in range(0, len(coords), batch_size):
        chunk = coords[b0:b0 + batch_size]
        batch = np.stack([img[y:y + th, x:x + tw] for y, x in chunk])[:, None].astype(np.float32)
        pred = np.asarray(fn(batch))
        if out is None:
            out = np.zeros((pred.shape[1], H, W), dtype=np.float32)
        for (y, x), p in zip(chunk, pred):
            y0 = 0 if y == 0 else halo
            x0 = 0 if x == 0 else halo
            y1 = th if y + th >= H else th - halo
            x1 = tw if x + tw >= W else tw - halo
            out[:, y + y0:y + y1, x + x0:x + x1] = p[:, y0:y1, x0:x1]
        if progress is not None:
            progress(min(b0 + batch_size, len(coords)), len(coords), "U-Net tiles")
    return out[:, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


@dataclass
class UNetModel:
    """A loaded U-Net (torch module or onnxruntime session) that maps an image to logits."""

    path: Path
    runtime: str  # "torch" | "onnx"
    device: str
    net: Any
    out_channels: int
    fixed_tile: int | None = None  # ONNX exports have a fixed spatial size

    @classmethod
    def load(cls, path: str | Path, *, runtime: str = "auto", device: str = "cpu") -> UNetModel:
        """Load weights (file or model folder). ``runtime``: auto (torch if importable, else onnx), torch, onnx."""
        p = Path(path)
        if p.is_dir():
            pt, onnx = p / "weights.pt", p / "weights.onnx"
            if runtime == "onnx" or (runtime == "auto" and not _has_torch() and onnx.exists()):
                p = onnx
            elif pt.exists():
                p = pt
            elif onnx.exists():
                p = onnx
            else:
                raise ToolError(f"No weights.pt or weights.onnx in {p}.", hint="Pass the model folder or a weights file.")
        if not p.is_file():
            raise ToolError(f"U-Net weights not found: {p}.", hint="Pass an existing weights.pt/.pth/.onnx file.")
        if p.suffix == ".onnx":
            return cls._load_onnx(p, device)
        if runtime == "onnx":
            raise ToolError(f"runtime='onnx' needs an .onnx file, got {p.name}.", hint="Pass weights.onnx.")
        if not _has_torch():
            raise ToolError("The U-Net torch runtime needs PyTorch, which is not installed.",
                            hint="pip install 'cytoagent[unet]', or pass weights.onnx to run with onnxruntime.")
        net = load_torch_unet(p, device)
        return cls(p, "torch", device, net, int(net.output_channels))

    @classmethod
    def _load_onnx(cls, p: Path, device: str) -> UNetModel:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ToolError("Running weights.onnx needs onnxruntime, which is not installed.",
                            hint="pip install 'cytoagent[unet]'.") from e
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        sess = ort.InferenceSession(str(p), providers=providers)
        inp = sess.get_inputs()[0]
        shape = inp.shape
        fixed = shape[2] if isinstance(shape[2], int) else None
        cout = sess.get_outputs()[0].shape[1]
        return cls(p, "onnx", device, sess, int(cout) if isinstance(cout, int) else 1, fixed)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(B, 1, h, w) normalised float32 → (B, C, h, w) logits."""
        if self.runtime == "onnx":
            name = self.net.get_inputs()[0].name
            if self.fixed_tile is not None and batch.shape[0] != 1:
                return np.concatenate([self.net.run(None, {name: b[None]})[0] for b in batch])
            return self.net.run(None, {name: batch})[0]
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return self.net(t).float().cpu().numpy()

    def predict(self, image: np.ndarray, *, tile: int | None = None, halo: int = 32, batch_size: int = 4,
                progress=None) -> np.ndarray:
        """Probabilities (C, H, W) for one (H, W) image: normalise → tiled logits → sigmoid.

        ``tile`` defaults to 1024 px for torch (most tiles fit in one pass) and is the export's fixed
        size for ONNX.
        """
        tile = int(tile or 1024)
        x = normalize(image)
        if self.fixed_tile is not None:  # ONNX exports take full tiles only (small images are padded)
            tile = self.fixed_tile
        logits = tiled_predict(x, self.logits, tile=tile, halo=halo, batch_size=batch_size, progress=progress,
                               divisor=tile if self.fixed_tile else 8)
        from scipy.special import expit

        return expit(logits).astype(np.float32)


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


@lru_cache(maxsize=4)
def _cached_model(path: str, runtime: str, device: str, mtime_ns: int = 0) -> UNetModel:
    """Loaded models are reused; ``mtime_ns`` in the key reloads a file that was rewritten."""
    return UNetModel.load(path, runtime=runtime, device=device)


# --------------------------------------------------------------------------- segmenter


class UNetSegmenter(Segmenter):
    """U-Net foreground (and optional boundary) probabilities → seeded watershed instances.

    Options: ``weights`` (path; see weights.py for the search order), ``runtime`` (auto|torch|onnx;
    auto = torch on CUDA, else the same-named ``.onnx`` export beside the weights if any, else torch),
    ``model_mpp`` (µm/px the model expects; with ``mpp`` the image is rescaled to it — default
    None = no rescaling for fluorescence, 0.5 for H&E), ``scale`` (explicit resize factor, overrides
    mpp), ``tile`` (torch: 1024; ONNX: the export's fixed 512), ``halo`` (32), ``threshold`` (0.5), ``min_distance`` (px at model scale, 3),
    ``min_size`` (px at model scale, 15).
    """

    def _model(self) -> UNetModel:
        path = find_weights("unet", self.options.get("weights"))
        runtime = self.options.get("runtime", "auto")
        if runtime not in ("auto", "torch", "onnx"):
            raise ToolError(f"Unknown U-Net runtime {runtime!r}.", hint="Use 'auto', 'torch' or 'onnx'.")
        device = self.resolved_device()
        twin = path.with_suffix(".onnx")  # bioimage.io layout: weights.pt and its export weights.onnx
        if runtime == "auto" and device == "cpu" and twin.is_file() and _has_onnxruntime():
            runtime = "onnx"  # on CPU the ONNX export is ~2-3x faster than torch; on CUDA torch is used
        if runtime == "onnx" and path.suffix != ".onnx":
            path = twin if twin.is_file() else path
        return _cached_model(str(path), runtime, device, path.stat().st_mtime_ns)

    def _scale(self, mpp: float | None) -> float:
        if self.options.get("scale") is not None:
            s = float(self.options["scale"])
            if not 0.05 <= s <= 20:
                raise ToolError(f"scale={s} is out of range.", hint="Use a resize factor between 0.05 and 20.")
            return s
        model_mpp = self.options.get("model_mpp", 0.5 if self.modality == "he" else None)
        if model_mpp is None or mpp is None:
            return 1.0
        if mpp <= 0:
            raise ToolError(f"mpp={mpp} must be > 0.", hint="Pass the pixel size in µm per pixel.")
        return float(mpp) / float(model_mpp)

    def _predict(self, image: np.ndarray, mpp: float | None) -> tuple[np.ndarray, tuple[int, int]]:
        chan = nuclear_channel(image, self.modality)
        x = rescale_for_model(chan, self._scale(mpp))
        prob = self._model().predict(x, tile=self.options.get("tile"),
                                     halo=int(self.options.get("halo", 32)), batch_size=self.batch_size)
        return prob, chan.shape

    def probabilities(self, image: np.ndarray, *, mpp: float | None = None) -> np.ndarray:
        """(C, H, W) sigmoid outputs at the input's resolution (C=1 foreground, C=2 + boundary)."""
        prob, shape = self._predict(np.asarray(image), mpp)
        return np.stack([resize_to(p, shape) for p in prob])

    def _segment_one(self, image: np.ndarray, *, mpp: float | None) -> np.ndarray:
        prob, shape = self._predict(image, mpp)
        labels = seeded_watershed(prob[0], prob[1] if prob.shape[0] > 1 else None,
                                  threshold=float(self.options.get("threshold", 0.5)),
                                  min_distance=int(self.options.get("min_distance", 3)),
                                  min_size=int(self.options.get("min_size", 15)))
        return resize_to(labels, shape, order=0)
