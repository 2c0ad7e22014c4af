"""The bundled data the experiments share: scikit-learn's 8×8 digits (1797 images, 10 classes).

One loader (:func:`load_digits`), the train / validation / test division the learning
experiments share (:func:`digits_three_way`) and the older two- and three-part splits.
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
    scaled by its training mean and standard deviation (:func:`standardize`: a pixel
    constant in the training part keeps scale 1). Keys ``xtr, ytr, xva, yva, xte, yte``:
    float32 inputs (N, 64), int64 labels.
    """
    X, y = load_digits()
    perm = np.random.default_rng(seed).permutation(len(y))
    n_tr, n_va = int(train * len(y)), int(val * len(y))
    tr, va, te = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]
    Xs = torch.tensor(standardize(X, tr), dtype=torch.float32)
    yt = torch.tensor(y)
    return {"xtr": Xs[tr], "ytr": yt[tr], "xva": Xs[va], "yva": yt[va], "xte": Xs[te], "yte": yt[te]}


def standardize(X: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``(X − μ) / σ`` with the mean and standard deviation of the rows ``train``; σ = 1 where a feature is
    constant on them (dividing by σ + ε instead would multiply that feature by 1/ε wherever it is not)."""
    mu, sd = X[train].mean(0), X[train].std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return (X - mu) / sd


#: the seed of the validation part :func:`digits_three_way` keeps fixed across replicates
VALIDATION_SEED = 20_211


def digits_three_way(seed: int, *, val: float | int = 0.2, test: float | int = 0.2, images: bool = False,
                     standardized: bool = False) -> dict[str, torch.Tensor]:
    """Train / validation / test parts of digits for replicate ``seed``, all three stratified by class.

    The validation part (a share ``val`` of the images, or that many) is the same for every ``seed``
    (drawn with :data:`VALIDATION_SEED`), so settings chosen on it are chosen once for all replicates and
    never on an image some replicate tests on; the rest is divided into training and test parts (``test``:
    a share of all images, or a count) by ``seed``. Pixels are scaled to [0, 1], or with
    ``standardized=True`` shifted and scaled by the training part's statistics (:func:`standardize`). Keys
    ``xtr, ytr, xva, yva, xte, yte``: float32 inputs (N, 64), or (N, 1, 8, 8) with ``images=True``; int64
    labels.
    """
    from sklearn.model_selection import train_test_split

    X, y = load_digits()
    n = len(y)
    idx = np.arange(n)
    rest, va = train_test_split(idx, test_size=val, random_state=VALIDATION_SEED, stratify=y)
    n_test = test if isinstance(test, int) else int(round(test * n))
    tr, te = train_test_split(rest, test_size=n_test, random_state=seed, stratify=y[rest])
    Xs = standardize(X, tr) if standardized else X / 16.0
    if images:
        Xs = Xs.reshape(-1, 1, 8, 8)
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    yt = torch.from_numpy(y).long()
    return {"xtr": f32(Xs[tr]), "ytr": yt[tr], "xva": f32(Xs[va]), "yva": yt[va], "xte": f32(Xs[te]), "yte": yt[te]}


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
