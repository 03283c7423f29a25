"""How a training job splits its examples: a held-out test set, then validation or k folds."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from shared.errors import InvalidArgumentError

TEST_SHARE = 0.2


def _stratify(labels: np.ndarray | None, share: float) -> np.ndarray | None:
    """Stratify only when every class can appear on both sides of the split."""
    if labels is None:
        return None
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    return labels if counts.min() >= 2 and len(labels) * min(share, 1 - share) >= len(counts) else None


def split_indices(
    n: int, labels: np.ndarray | None, share: float, seed: int, candidates: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held back): `share` of the candidates (all indices by default) held back."""
    indices = np.arange(n) if candidates is None else candidates
    stratify = _stratify(None if labels is None else labels[indices], share)
    kept, held = train_test_split(indices, test_size=share, stratify=stratify, random_state=seed)
    return np.sort(kept), np.sort(held)


def folds(indices: np.ndarray, labels: np.ndarray | None, k: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    sub_labels = None if labels is None else labels[indices]
    use_strata = sub_labels is not None and np.bincount(sub_labels)[np.bincount(sub_labels) > 0].min() >= k
    splitter = (StratifiedKFold if use_strata else KFold)(n_splits=k, shuffle=True, random_state=seed)
    for train, val in splitter.split(indices, sub_labels if use_strata else None):
        yield indices[train], indices[val]


def cv_summary(fold_metrics: list[dict[str, float]]) -> dict[str, float]:
    summary = {}
    for name in fold_metrics[0]:
        values = [m[name] for m in fold_metrics]
        summary[f"cv_{name}_mean"] = float(np.mean(values))
        summary[f"cv_{name}_std"] = float(np.std(values))
    return summary


def validate_or_cross_validate(context, n: int, labels: np.ndarray | None, rest: np.ndarray, fresh, epoch_fn, evaluate):
    """With k_folds, trains one fresh model per fold and returns the cross-validation summary,
    training the final model on all of `rest`; otherwise holds back a validation split.

    Returns (metrics, train indices, validation indices or None).
    """
    spec = context.spec
    if not spec["k_folds"]:
        train, val = split_indices(n, labels, spec["validation_split"], spec["seed"], candidates=rest)
        return {}, train, val
    fold_metrics = []
    for i, (train, val) in enumerate(folds(rest, labels, spec["k_folds"], spec["seed"]), start=1):
        context.raise_if_cancelled()
        net, opt = fresh()
        step = epoch_fn(net, opt, train)
        for epoch in range(spec["epochs"]):
            step(epoch)
        fold_metrics.append(evaluate(net, val))
        context.message(f"fold {i}/{spec['k_folds']}: {fold_metrics[-1]}")
    return cv_summary(fold_metrics), rest, None


def fit_and_evaluate(context, n: int, labels: np.ndarray | None, rest, test, fresh, epoch_fn, evaluate,
                     sharded=None):  # fmt: skip
    """The shape of every training job: validate (or cross-validate), fit the final model with
    checkpoints, then measure it on the held-out test set. Returns (model, metrics).

    `sharded` (a shared.data_parallel.ShardedFit) is how the family's data and network travel to
    data-parallel workers; a job with world_size > 1 fits on them, and is measured here like any other."""
    from shared.training import run_epochs

    metrics, train, val = validate_or_cross_validate(context, n, labels, rest, fresh, epoch_fn, evaluate)
    net, opt = fresh()
    if int(context.spec.get("world_size") or 1) > 1:
        from shared.data_parallel import fit_data_parallel

        if sharded is None:
            raise InvalidArgumentError(f"world_size: {context.family} jobs train in one process; use world_size 1")
        losses = fit_data_parallel(context, net, sharded, train, val)
    else:
        losses = run_epochs(
            context,
            net,
            opt,
            context.spec["epochs"],
            epoch_fn(net, opt, train),
            lambda: evaluate(net, val) if val is not None else {},
        )
    metrics.update(evaluate(net, test))
    metrics["final_train_loss"] = losses[-1]
    return net, metrics
