"""Every explanation method stops at its next checkpoint once cancelled, on the real default models.

The sync Explain path sets a Cancellation when the caller's deadline passes; here a check that
cancels after the first forward pass stands in for that moment, so the test depends on no timing:
each method must then stop within one pass, where it would otherwise have made many more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.dense.datasets import digits_split
from services.dense.explain import DenseExplainLimits, ExplainableDense
from services.gnn.explain import ExplainParams, GnnExplainLimits, explain_query, resolve_query
from services.gnn.runtime import GnnModel, QueryLimits
from services.nlp.explain import explain_text
from services.nlp.runtime import nlp_loader
from shared.explanations import ExplanationCancelled, cancellable
from shared.onnx_session import OnnxConfig

CPU = OnnxConfig(device="cpu")
LONG_TEXT = " ".join(["The host was kind and the room was clean, but the street outside was loud at night."] * 2)


class CountingCheck:
    """Counts checkpoints; with `stop_after`, cancels the explanation at the checkpoint after that many."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise ExplanationCancelled("cancelled by the test")


def passes_until_cancelled(explain) -> tuple[int, int]:
    """(checkpoints of a whole explanation, checkpoints of one cancelled after its first pass)."""
    whole = CountingCheck()
    with cancellable(whole):
        explain()
    cancelled = CountingCheck(stop_after=1)
    with cancellable(cancelled), pytest.raises(ExplanationCancelled):
        explain()
    return whole.calls, cancelled.calls


def loaded(store, name):
    manifest = store.manifest(name, store.default_version(name))
    return manifest, store.artifacts(manifest)


@pytest.mark.parametrize(
    ("method", "rows", "steps"), [("integrated_gradients", 32, 256), ("kernel_shap", 2, 600)]
)
def test_dense_methods_stop_within_one_forward_pass(model_store, method, rows, steps):
    form = ExplainableDense(*loaded(model_store, "digits-mlp"), CPU)
    x = digits_split()[1][:rows].astype(np.float32)
    whole, cancelled = passes_until_cancelled(
        lambda: form.explain({"pixels": x}, method, {}, steps, None, DenseExplainLimits())
    )
    assert whole >= 4 and cancelled == 2


def test_nlp_occlusion_stops_within_one_encoder_run(model_store):
    manifest, artifacts = loaded(model_store, "sentiment")
    predictor = nlp_loader(model_store, CPU, 128)(manifest, artifacts)
    whole, cancelled = passes_until_cancelled(
        lambda: explain_text(predictor, manifest.class_names, LONG_TEXT, "occlusion", None, "")
    )
    assert whole >= 4 and cancelled == 2


@pytest.mark.parametrize(("method", "epochs"), [("gnn_explainer", 20), ("integrated_gradients", 4)])
def test_gnn_methods_stop_within_one_epoch_or_step(model_store, method, epochs):
    manifest, artifacts = loaded(model_store, "karate-gcn")
    model = GnnModel(manifest, artifacts, torch.device("cpu"))
    params = ExplainParams(stored_graph="karate", node_ids=[5], method=method, epochs=epochs)
    query = resolve_query(model, manifest, params, None, GnnExplainLimits(), QueryLimits())
    whole, cancelled = passes_until_cancelled(
        lambda: explain_query(model.net, manifest, query, params, GnnExplainLimits())
    )
    assert whole >= epochs and cancelled == 2
