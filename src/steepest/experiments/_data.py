"""The bundled data the experiments share: scikit-learn's 8×8 digits (1797 images, 10 classes).

One loader (:func:`load_digits`) and the three splits the experiments use; each
experiment keeps the split its published numbers were measured on.
"""

from __future__ import annotations

import numpy as np
import torch


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Pixels (1797, 64) as float64 in 0…16 and labels (1797,) as int64."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    return d.data, d.target


def digits_split(test_size: float | int, seed: int, *, images: bool = False) -> tuple[torch.Tensor, ...]:
    """A stratified train/test split of digits, pixels scaled to [0, 1].

    Returns ``(x_train, y_train, x_test, y_test)``: float32 inputs of shape (N, 64),
    or (N, 1, 8, 8) with ``images=True``, and int64 labels. ``test_size`` and
    ``seed`` are ``sklearn.model_selection.train_test_split``'s ``test_size`` and
    ``random_state``.
    """
    from sklearn.model_selection import train_test_split

    data, target = load_digits()
    x = (data.reshape(-1, 1, 8, 8) if images else data) / 16.0
    xtr, xte, ytr, yte = train_test_split(x, target, test_size=test_size, random_state=seed, stratify=target)
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return f32(xtr), torch.from_numpy(ytr).long(), f32(xte), torch.from_numpy(yte).long()


def digits_permutation_split(seed: int, train: float = 0.6, val: float = 0.2) -> dict[str, torch.Tensor]:
    """Train / validation / test parts of one numpy permutation, standardized with the training part's statistics.

    The first ``int(train·N)`` indices of ``np.random.default_rng(seed).permutation(N)``
    train, the next ``int(val·N)`` validate, the rest test; every pixel is shifted and
    scaled by its training mean and standard deviation (+1e-8). Keys ``xtr, ytr, xva,
    yva, xte, yte``: float32 inputs (N, 64), int64 labels.
    """
    X, y = load_digits()
    perm = np.random.default_rng(seed).permutation(len(y))
    n_tr, n_va = int(train * len(y)), int(val * len(y))
    tr, va, te = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-8
    Xs = torch.tensor((X - mu) / sd, dtype=torch.float32)
    yt = torch.tensor(y)
    return {"xtr": Xs[tr], "ytr": yt[tr], "xva": Xs[va], "yva": yt[va], "xte": Xs[te], "yte": yt[te]}


def digits_generator_split(seed: int, n_test: int = 360) -> tuple[torch.Tensor, ...]:
    """Train / test parts of one ``torch.randperm`` (a generator seeded with ``seed``), pixels scaled to [0, 1].

    The first ``n_test`` indices of the permutation test, the rest train. Returns
    ``(x_train, y_train, x_test, y_test)``: float32 inputs (N, 64), int64 labels.
    """
    data, target = load_digits()
    X = torch.tensor(data, dtype=torch.float32) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:n_test], perm[n_test:]
    return X[tr], y[tr], X[te], y[te]
