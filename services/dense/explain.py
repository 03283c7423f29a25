"""Dense explanations with Captum: Integrated Gradients on a version's torch form, or feature ablation
and KernelShap on its ONNX session, which every version has.

Each row is explained for one output column (its target): the class probability for classifiers,
the value for regressors. Attributions come back in the shape of each input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import FeatureAblation, IntegratedGradients, KernelShap

from services.dense import torch_form
from shared.errors import InvalidArgumentError
from shared.explanations import check_method, check_steps, checked
from shared.model_store import Artifacts, Manifest
from shared.onnx_session import OnnxConfig, OnnxSession

INTEGRATED_GRADIENTS = "integrated_gradients"
FEATURE_ABLATION = "feature_ablation"
KERNEL_SHAP = "kernel_shap"
METHODS = (INTEGRATED_GRADIENTS, FEATURE_ABLATION, KERNEL_SHAP)
DEFAULT_STEPS = {INTEGRATED_GRADIENTS: 64, KERNEL_SHAP: 200, FEATURE_ABLATION: 0}
FLOAT_DTYPES = (np.float32, np.float64, np.float16)
IG_CHUNK_ROWS = 4096  # interpolated rows per forward pass: one chunk between two cancellation checkpoints


@dataclass(frozen=True)
class DenseExplainLimits:
    max_rows: int = 64
    max_steps: int = 1024  # integrated_gradients
    max_samples: int = 4096  # kernel_shap


@dataclass
class DenseExplanation:
    method: str
    attributions: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    targets: np.ndarray
    scores: np.ndarray
    baseline_scores: np.ndarray


class ExplainableDense:
    """A version as explanations need it: its ONNX session, and its torch form when it has one."""

    def __init__(self, manifest: Manifest, artifacts: Artifacts, config: OnnxConfig | None = None) -> None:
        self.manifest = manifest
        self.session = OnnxSession(artifacts.read(manifest.config.get("onnx_file", "model.onnx")), config)
        self.scored = torch_form.load_scored(manifest, artifacts)
        self.names = [spec.name for spec in manifest.inputs]
        outputs = self.session.output_names
        self.classifier = "probabilities" in outputs and "label" in outputs
        self.score_output = "probabilities" if self.classifier else outputs[0]

    def default_method(self) -> str:
        return INTEGRATED_GRADIENTS if self.scored is not None else FEATURE_ABLATION

    def onnx_scores(self, dtypes: dict[str, np.dtype]):
        """The explained outputs as a function of torch tensors, computed by the ONNX session."""

        def scores(*tensors: torch.Tensor) -> torch.Tensor:
            feeds = {
                name: tensor.detach().cpu().numpy().astype(dtypes[name], copy=False)
                for name, tensor in zip(self.names, tensors, strict=True)
            }
            return torch.from_numpy(np.asarray(self.session.run(feeds)[self.score_output], dtype=np.float32))

        return scores

    def explain(
        self,
        inputs: dict[str, np.ndarray],
        method: str,
        baselines: dict[str, np.ndarray],
        steps: int,
        target: int | None,
        limits: DenseExplainLimits,
        validate_only: bool = False,
    ) -> DenseExplanation | None:
        """Explains every row; with `validate_only`, checks the request and returns None."""
        method = method or self.default_method()
        check_method(method, METHODS)
        if method == INTEGRATED_GRADIENTS and self.scored is None:
            raise InvalidArgumentError(
                f"method: {self.manifest.name!r} v{self.manifest.version} has no torch form, which "
                f"integrated_gradients needs; use {FEATURE_ABLATION} or {KERNEL_SHAP}"
            )
        check_steps(steps, limits.max_samples if method == KERNEL_SHAP else limits.max_steps)
        steps = steps or DEFAULT_STEPS[method]
        rows = len(inputs[self.names[0]])
        if rows > limits.max_rows:
            raise InvalidArgumentError(f"inputs: {rows} rows; the service explains at most {limits.max_rows} per call "
                                       "(max_explain_rows)")  # fmt: skip
        for name in self.names:
            if inputs[name].dtype.type not in FLOAT_DTYPES:
                raise InvalidArgumentError(f"inputs['{name}']: explanations need floating-point inputs, got "
                                           f"{inputs[name].dtype}")  # fmt: skip
        base = {name: self._baseline(name, inputs[name], baselines.get(name)) for name in self.names}
        for name in baselines:
            if name not in self.names:
                raise InvalidArgumentError(f"baselines: unknown input {name!r}; the model takes {self.names}")

        width = self.output_width()
        if target is not None and not 0 <= target < width:
            raise InvalidArgumentError(f"target: must be 0..{width - 1} (an output column of {self.score_output!r}), "
                                       f"got {target}")  # fmt: skip
        if validate_only:
            return None
        outputs = self.session.run(inputs)
        if target is None:
            targets = outputs["label"].astype(np.int64) if self.classifier else np.zeros(rows, np.int64)
        else:
            targets = np.full(rows, target, np.int64)

        x = tuple(torch.tensor(inputs[name], dtype=torch.float32) for name in self.names)
        b = tuple(torch.tensor(base[name], dtype=torch.float32) for name in self.names)
        target_t = torch.as_tensor(targets)
        # Every forward pass (one chunk of steps, perturbations or samples) passes a checkpoint first,
        # so a cancelled explanation stops within one chunk.
        if method == INTEGRATED_GRADIENTS:
            score = checked(self.scored)
            ig = IntegratedGradients(score)
            attributions = ig.attribute(x, baselines=b, target=target_t, n_steps=steps,
                                        internal_batch_size=max(1, IG_CHUNK_ROWS // max(1, rows)) * rows)  # fmt: skip
        elif method == FEATURE_ABLATION:
            score = checked(self.onnx_scores({name: inputs[name].dtype for name in self.names}))
            features = sum(int(np.prod(t.shape[1:])) for t in x)
            attributions = FeatureAblation(score).attribute(
                x, baselines=b, target=target_t, perturbations_per_eval=max(1, min(features, 4096 // max(1, rows)))
            )
        else:
            score = checked(self.onnx_scores({name: inputs[name].dtype for name in self.names}))
            per_row = []
            for row in range(rows):
                attr = KernelShap(score).attribute(
                    tuple(t[row : row + 1] for t in x),
                    baselines=tuple(t[row : row + 1] for t in b),
                    target=int(targets[row]),
                    n_samples=steps,
                    perturbations_per_eval=min(steps, 256),
                )
                per_row.append(attr)
            attributions = tuple(torch.cat([attr[i] for attr in per_row]) for i in range(len(x)))
        with torch.no_grad():
            scores = score(*x).gather(1, target_t[:, None])[:, 0].numpy()
            baseline_scores = score(*b).gather(1, target_t[:, None])[:, 0].numpy()
        return DenseExplanation(
            method=method,
            attributions={
                name: attr.detach().numpy().astype(np.float32).reshape(inputs[name].shape)
                for name, attr in zip(self.names, attributions, strict=True)
            },
            outputs=outputs,
            targets=targets,
            scores=scores.astype(np.float64),
            baseline_scores=baseline_scores.astype(np.float64),
        )

    def output_width(self) -> int:
        """Columns of the explained output, from the signature (or one run of zeros when it is dynamic)."""
        spec = next((o for o in self.manifest.outputs if o.name == self.score_output), None)
        if spec is not None and len(spec.shape) == 2 and spec.shape[1] > 0:
            return spec.shape[1]
        zeros = {i.name: np.zeros([1, *(max(d, 1) for d in i.shape[1:])], np.float32) for i in self.manifest.inputs}
        return int(self.session.run(zeros)[self.score_output].shape[-1])

    @staticmethod
    def _baseline(name: str, array: np.ndarray, given: np.ndarray | None) -> np.ndarray:
        if given is None:
            return np.zeros_like(array)
        field = f"baselines['{name}']"
        if given.dtype != array.dtype:
            raise InvalidArgumentError(f"{field}: dtype must be the input's ({array.dtype}), got {given.dtype}")
        if given.shape == array.shape:
            return given
        if given.shape in (array.shape[1:], (1, *array.shape[1:])):
            return np.broadcast_to(given.reshape(1, *array.shape[1:]), array.shape)
        raise InvalidArgumentError(
            f"{field}: shape must be the input's {list(array.shape)} or one row's {list(array.shape[1:])}, "
            f"got {list(given.shape)}"
        )


def explainable_loader(config: OnnxConfig):
    def load(manifest: Manifest, artifacts: Artifacts) -> ExplainableDense:
        return ExplainableDense(manifest, artifacts, config)

    return load
