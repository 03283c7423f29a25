"""How long an explanation past its caller's deadline keeps holding the explanation thread.

Run with `make bench`. For one expensive explanation per family (dense Integrated Gradients at the
step limit, nlp occlusion of a long text, gnn GNNExplainer at the epoch limit), on the default
models, in one ExplanationRunner with one thread as a service has:
  * the baseline: the whole explanation, run to the end;
  * the call: the same explanation under a deadline of a tenth of that, answered DEADLINE_EXCEEDED,
    then a trivial explanation queued behind it; measured from the start until that one answers.
Before explanations were cancellable the second figure was the first plus the deadline's wait; now
the thread is free one forward pass after the deadline. Reported as the ratio of the two.

What runs before the first forward pass is not interruptible: for Integrated Gradients, Captum's
Gauss-Legendre points for n steps (an n x n eigenproblem, computed twice: about a second at 1024
steps on a busy 2-core machine).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

from services.dense.datasets import digits_split
from services.dense.explain import DenseExplainLimits, ExplainableDense
from services.gnn.explain import ExplainParams, GnnExplainLimits, explain_query, resolve_query
from services.gnn.runtime import GnnModel, QueryLimits
from services.nlp.explain import explain_text
from services.nlp.runtime import nlp_loader
from shared.errors import DeadlineExceededError
from shared.explanations import ExplanationRunner
from shared.onnx_session import OnnxConfig
from tests.stores import default_models

CPU = OnnxConfig(device="cpu")
TEXT = " ".join(["The host was kind and the room was clean, but the street outside was loud at night."] * 5)


def explanations():
    """(name, a function that runs one expensive explanation) per family, on the default models."""
    store = default_models()

    def loaded(name):
        manifest = store.manifest(name, store.default_version(name))
        return manifest, store.artifacts(manifest)

    dense = ExplainableDense(*loaded("digits-mlp"), CPU)
    x = digits_split()[1][:64].astype(np.float32)
    manifest, artifacts = loaded("sentiment")
    classifier = nlp_loader(store, CPU, 128)(manifest, artifacts)
    gnn_manifest, gnn_artifacts = loaded("karate-gcn")
    gnn = GnnModel(gnn_manifest, gnn_artifacts, torch.device("cpu"))
    gnn_params = ExplainParams(stored_graph="karate", node_ids=[0, 5, 33], method="gnn_explainer", epochs=1024)
    gnn_query = resolve_query(gnn, gnn_manifest, gnn_params, None, GnnExplainLimits(), QueryLimits())
    return [
        ("dense integrated_gradients, 64 rows x 1024 steps",
         lambda: dense.explain({"pixels": x}, "integrated_gradients", {}, 1024, None, DenseExplainLimits())),
        ("nlp occlusion, one 100-token text",
         lambda: explain_text(classifier, manifest.class_names, TEXT, "occlusion", None, "")),
        ("gnn gnn_explainer, 1024 epochs",
         lambda: explain_query(gnn.net, gnn_manifest, gnn_query, gnn_params, GnnExplainLimits())),
    ]  # fmt: skip


async def measure(explain) -> tuple[float, float]:
    """(seconds of the whole explanation, seconds until the thread answered the next one after a deadline)."""
    runner = ExplanationRunner(threads=1)
    started = time.perf_counter()
    await runner.run(explain)
    whole = time.perf_counter() - started
    started = time.perf_counter()
    try:
        await runner.run(explain, deadline=time.monotonic() + whole / 10)
    except DeadlineExceededError:
        pass
    await runner.run(lambda: None)
    return whole, time.perf_counter() - started


def main() -> None:
    print("explanation past a deadline of 1/10 of its run time: how long it held the thread (one run each)")
    for name, explain in explanations():
        whole, freed = asyncio.run(measure(explain))
        print(f"  {name:48s} whole {whole:6.2f} s   thread free after {freed:6.2f} s   ratio {freed / whole:.2f}x")


if __name__ == "__main__":
    main()
