"""Evaluation on the test split: accuracy, per-class accuracy (classes with no test image: None) and the
confusion matrix (rows: true class, columns: predicted; counts)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             classes: list[str], device: torch.device, progress: bool = True) -> dict[str, Any]:
    """``batches``: (images, labels); where it has a ``len()`` (images), the progress bar counts to it."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    n = len(classes)
    confusion = torch.zeros(n * n, dtype=torch.long)
    bar = tqdm(total=len(batches) if hasattr(batches, "__len__") else None, desc="evaluate", unit="image",
               disable=not progress, dynamic_ncols=True)
    for x, y in batches:
        bar.update(len(y))
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= n):
            raise ValueError(f"test labels must be in [0, {n}), got {sorted(set(y.tolist()))}")
        pred = model(x.to(device)).argmax(dim=1).cpu()
        if len(pred) and int(pred.max()) >= n:
            raise ValueError(f"the model predicts class {int(pred.max())}, but there are {n} classes")
        confusion += torch.bincount(y * n + pred, minlength=n * n)
    bar.close()
    confusion = confusion.reshape(n, n)
    total, correct = confusion.sum(dim=1), confusion.diagonal()
    if int(total.sum()) == 0:
        raise ValueError("the test split is empty")
    per_class = {c: (float(correct[i]) / float(total[i]) if total[i] else None) for i, c in enumerate(classes)}
    return {"accuracy": float(correct.sum()) / float(total.sum()), "per_class_accuracy": per_class,
            "num_test": int(total.sum()), "confusion": confusion.tolist()}
