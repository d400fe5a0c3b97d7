"""Slide-level classifiers trained on tile features.

- ``pooling="mean"``: every slide becomes the mean and standard deviation of its tile features;
  a standardised logistic regression (scikit-learn) predicts the slide label.
- ``pooling="attention"``: gated-attention multiple-instance learning (Ilse et al. 2018) in
  PyTorch: tile features → attention weights → weighted mean → linear classifier, so the model can
  pick out a few informative tiles (e.g. a small tumour focus) that a plain mean dilutes.

Accuracy is estimated by stratified k-fold cross-validation (folds = min(5, smallest class)),
then the model is refit on all slides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from servers.common.errors import ToolError

POOLINGS = ("mean", "attention")


@dataclass
class SlideClassifier:
    pooling: str
    columns: list[str]
    classes: list[str]
    mean_: np.ndarray
    scale_: np.ndarray
    model: Any  # sklearn pipeline or torch state dict
    cv_accuracy: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def _bag(self, df) -> np.ndarray:
        X = df[self.columns].to_numpy(np.float64)
        return np.nan_to_num((X - self.mean_) / self.scale_)

    def predict_proba(self, bags: list) -> np.ndarray:
        if self.pooling == "mean":
            return self.model.predict_proba(np.stack([_mean_pool(self._bag(b)) for b in bags]))
        net = _make_net(len(self.columns), len(self.classes))
        net.load_state_dict(self.model)
        return np.stack([_attention_forward(net, self._bag(b))[0] for b in bags])

    def predict(self, bags: list) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(bags).argmax(axis=1)]

    def attention(self, bag) -> np.ndarray:
        """Per-tile attention weights (attention pooling only)."""
        if self.pooling != "attention":
            raise ToolError("Attention weights exist only for pooling='attention'.")
        net = _make_net(len(self.columns), len(self.classes))
        net.load_state_dict(self.model)
        return _attention_forward(net, self._bag(bag))[1]


def _mean_pool(X: np.ndarray) -> np.ndarray:
    return np.concatenate([X.mean(axis=0), X.std(axis=0)])


def _make_net(n_in: int, n_classes: int, hidden: int = 32):
    import torch
    from torch import nn

    class GatedAttentionMIL(nn.Module):
        """Batched bags (B, N, F) with a (B, N) validity mask → (B, classes) logits, (B, N) weights."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU())
            self.att_v = nn.Linear(hidden, hidden)
            self.att_u = nn.Linear(hidden, hidden)
            self.att_w = nn.Linear(hidden, 1)
            self.head = nn.Linear(hidden, n_classes)

        def forward(self, x, mask):
            h = self.embed(x)
            a = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))).squeeze(-1)
            a = a.masked_fill(~mask, float("-inf"))
            w = torch.softmax(a, dim=1)
            return self.head((w[..., None] * h).sum(1)), w

    torch.manual_seed(0)
    return GatedAttentionMIL()


def _pad(bags: list[np.ndarray]):
    import torch

    n = max(b.shape[0] for b in bags)
    X = np.zeros((len(bags), n, bags[0].shape[1]), np.float32)
    M = np.zeros((len(bags), n), bool)
    for i, b in enumerate(bags):
        X[i, : len(b)] = b
        M[i, : len(b)] = True
    return torch.as_tensor(X), torch.as_tensor(M)


def _attention_forward(net, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    net.eval()
    x, m = _pad([X])
    with torch.no_grad():
        logits, w = net(x, m)
        return torch.softmax(logits[0], 0).numpy(), w[0].numpy()


def _fit_attention(bags: list[np.ndarray], y: np.ndarray, n_classes: int, epochs: int = 120, seed: int = 0):
    """Full-batch Adam on the padded bags (small data: hundreds of slides at most)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        net = _make_net(bags[0].shape[1], n_classes)
        opt = torch.optim.Adam(net.parameters(), lr=2e-2, weight_decay=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()
        x, m = _pad(bags)
        target = torch.as_tensor(y, dtype=torch.long)
        net.train()
        for _ in range(epochs):
            logits, _ = net(x, m)
            loss = loss_fn(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {k: v.detach().clone() for k, v in net.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def _fit(pooling: str, bags: list[np.ndarray], y: np.ndarray, n_classes: int):
    if pooling == "mean":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(
            np.stack([_mean_pool(b) for b in bags]), y)
    return _fit_attention(bags, y, n_classes)


def train_slide_classifier(slide_tables: dict[str, Any], labels: dict[str, str], *, pooling: str = "mean",
                           columns: list[str] | None = None, cv: bool = True) -> SlideClassifier:
    """Train on ``{slide: tile-feature DataFrame}`` and ``{slide: label}``."""
    from servers.wsi.features import feature_columns

    if pooling not in POOLINGS:
        raise ToolError(f"Unknown pooling {pooling!r}.", hint=f"Use one of: {', '.join(POOLINGS)}.")
    names = [s for s in slide_tables if s in labels]
    missing = sorted(set(labels) - set(slide_tables))
    if missing:
        raise ToolError(f"No tile features for slides {missing[:5]}.", hint="Compute tile features for every labelled slide.")
    classes = sorted({str(labels[s]) for s in names})
    if len(classes) < 2:
        raise ToolError(f"Need at least two slide classes, got {classes}.", hint="Label slides with >= 2 classes.")
    first = slide_tables[names[0]]
    cols = columns or feature_columns(first)
    allX = np.concatenate([slide_tables[s][cols].to_numpy(np.float64) for s in names])
    mean_, scale_ = np.nanmean(allX, axis=0), np.nanstd(allX, axis=0)
    scale_[~(scale_ > 0)] = 1.0
    bags = [np.nan_to_num((slide_tables[s][cols].to_numpy(np.float64) - mean_) / scale_) for s in names]
    y = np.array([classes.index(str(labels[s])) for s in names])
    acc = None
    counts = np.bincount(y)
    k = int(min(5, counts.min()))
    if cv and k >= 2:
        from sklearn.model_selection import StratifiedKFold

        correct = 0
        for tr, te in StratifiedKFold(k, shuffle=True, random_state=0).split(np.zeros(len(y)), y):
            m = _fit(pooling, [bags[i] for i in tr], y[tr], len(classes))
            clf = SlideClassifier(pooling, cols, classes, np.zeros(len(cols)), np.ones(len(cols)), m)
            pred = clf.predict_proba([_as_df(bags[i], cols) for i in te]).argmax(axis=1)
            correct += int((pred == y[te]).sum())
        acc = correct / len(y)
    model = _fit(pooling, bags, y, len(classes))
    return SlideClassifier(pooling, cols, classes, mean_, scale_, model, acc,
                           {"n_slides": len(names), "class_counts": {c: int(n) for c, n in zip(classes, counts)},
                            "cv_folds": k if cv and k >= 2 else 0})


def _as_df(X: np.ndarray, cols: list[str]):
    import pandas as pd

    return pd.DataFrame(X, columns=cols)
