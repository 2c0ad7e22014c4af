"""The bundled data the experiments share: scikit-learn's 8×8 digits (1797 images, 10 classes)."""

from __future__ import annotations

import numpy as np
import torch


def digits_split(test_size: float | int, seed: int, *, images: bool = False) -> tuple[torch.Tensor, ...]:
    """A stratified train/test split of digits, pixels scaled to [0, 1].

    Returns ``(x_train, y_train, x_test, y_test)``: float32 inputs of shape (N, 64),
    or (N, 1, 8, 8) with ``images=True``, and int64 labels. ``test_size`` and
    ``seed`` are ``sklearn.model_selection.train_test_split``'s ``test_size`` and
    ``random_state``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images[:, None] if images else d.data) / 16.0
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_size, random_state=seed, stratify=d.target)
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return f32(xtr), torch.from_numpy(ytr).long(), f32(xte), torch.from_numpy(yte).long()
