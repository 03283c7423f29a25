"""The models the benchmarks build for themselves still publish: `make bench` is not part of `make test`,
so a change to the publishing code would otherwise break it unseen."""

from __future__ import annotations

from shared.model_store import ModelStore
from tests.bench.bench_batching import build_wide_mlp


def test_the_batching_bench_publishes_its_wide_mlp(tmp_path):
    store = ModelStore(tmp_path)
    build_wide_mlp(store)
    assert store.versions("wide-mlp") == [1]
    manifest = store.manifest("wide-mlp", 1)
    assert manifest.framework == "onnx"
    store.verify(manifest)  # every artifact is there and matches its digest
