"""ONNX export of graph networks, attempted for every architecture and checked before it is kept.

torch.onnx's TorchScript exporter (the dynamo exporter needs onnxscript, which is not installed)
traces the network once; message passing's scatter ops may then carry sizes of the traced graph
as constants (pyg-team/pytorch_geometric #6000, #7890). So an export counts only if ONNX Runtime
matches torch within 1e-5 on a graph of another size (and, for graph-level models, another
number of graphs) than the one it was traced on. Otherwise the manifest records why, and torch
serves the model.

Graph classifiers' sum readout (global_add_pool) sizes its output with `int(batch.max()) + 1`,
which tracing freezes: ScatterElements then refuses any batch of more graphs than the traced one.
They are traced through `TraceableReadout`, which sizes the same scatter-add from the batch
tensor itself, so the number of graphs stays dynamic in the ONNX graph.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

TOLERANCE = 1e-5
EXPORTER = "torch.onnx.export(dynamo=False) opset 17"


class TraceableReadout(torch.nn.Module):
    """A GraphClassifier (same submodules, same weights) whose readout traces with a dynamic number
    of graphs: zeros of [batch.max() + 1, hidden] built from tensors, then the scatter-add that
    global_add_pool does. Every graph has a node, so batch.max() + 1 is the number of graphs."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        h = self.classifier.gnn(x, edge_index)
        graphs = torch.arange(batch.max() + 1, device=h.device)
        zeros = torch.zeros_like(graphs, dtype=h.dtype).unsqueeze(1).expand(-1, h.shape[1])
        return self.classifier.head(zeros.scatter_add(0, batch.unsqueeze(1).expand_as(h), h))


def example_inputs(config: dict[str, Any], nodes: int, edges: int, graphs: int, seed: int) -> dict[str, np.ndarray]:
    """A random graph (or `graphs` graphs, for graph-level models) of the model's feature width."""
    rng = np.random.default_rng(seed)
    inputs = {
        "node_features": rng.normal(size=(nodes, config["in_channels"])).astype(np.float32),
        "edge_index": rng.integers(0, nodes, size=(2, edges)).astype(np.int64),
    }
    if config.get("task") == "graph":
        inputs["batch"] = np.sort(np.arange(nodes) % graphs).astype(np.int64)
    return inputs


def run_torch(net: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return net(*(torch.from_numpy(value) for value in inputs.values())).numpy()


def export_onnx(net: torch.nn.Module, config: dict[str, Any]) -> tuple[bytes | None, dict[str, Any]]:
    """(the ONNX model, or None; what the manifest records: exported, and max_abs_diff or reason)."""
    import onnxruntime as ort

    net = net.eval().cpu()
    traced = TraceableReadout(net) if config.get("task") == "graph" else net
    traced_on = example_inputs(config, nodes=7, edges=12, graphs=1, seed=0)
    checked_on = example_inputs(config, nodes=23, edges=61, graphs=3, seed=1)
    names = list(traced_on)
    axes = {"node_features": {0: "nodes"}, "edge_index": {1: "edges"}, "batch": {0: "nodes"}}
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(traced, tuple(torch.from_numpy(v) for v in traced_on.values()), buffer, dynamo=False,
                              input_names=names, output_names=["output"], opset_version=17,
                              dynamic_axes={name: axes[name] for name in names})  # fmt: skip
        options = ort.SessionOptions()
        options.log_severity_level = 4  # the failure is returned, not logged
        session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        onnx_output = session.run(None, checked_on)[0]
    except Exception as exc:  # noqa: BLE001 - any exporter or runtime failure is the recorded reason
        return None, {"exported": False, "exporter": EXPORTER, "reason": f"{type(exc).__name__}: {_first_line(exc)}"}
    expected = run_torch(net, checked_on)
    if onnx_output.shape != expected.shape:
        reason = (f"ONNX Runtime gave shape {list(onnx_output.shape)} where torch gives {list(expected.shape)} on a "
                  "graph of another size: a traced size stayed constant")  # fmt: skip
        return None, {"exported": False, "exporter": EXPORTER, "reason": reason}
    diff = float(np.abs(onnx_output - expected).max())
    if diff > TOLERANCE:
        reason = f"ONNX Runtime differs from torch by {diff:.2e} (> {TOLERANCE}) on a graph of another size"
        return None, {"exported": False, "exporter": EXPORTER, "reason": reason}
    return buffer.getvalue(), {"exported": True, "exporter": EXPORTER, "max_abs_diff": diff}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def model_files(net: torch.nn.Module, config: dict) -> dict[str, bytes]:
    """Weights as safetensors and, where the export holds up, model.onnx, in memory (they reach disk
    only as the model store writes them, sealed when it is encrypted); records both in `config`."""
    files = {"weights.safetensors": save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})}
    config["weights_file"] = "weights.safetensors"
    onnx_model, config["onnx"] = export_onnx(net, config)
    if onnx_model is not None:
        config["onnx_file"] = "model.onnx"
        files["model.onnx"] = onnx_model
    return files
