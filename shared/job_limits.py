"""How big one training job may be: its network's parameters and layers, and the rows it trains on.

The gateway checks a spec at submit with what it knows then (the architecture, and for built-in
data sets and uploads a trainer has already parsed, the input width, classes and rows); the
trainer checks again, exactly, once it has parsed the data. Both answer INVALID_ARGUMENT naming
the limit. The limits are the trainers' settings; each trainer publishes its family's limits in
the queue's Redis, which is where the gateway reads them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from shared.errors import InvalidArgumentError
from shared.settings import TrainerSettings


@dataclass(frozen=True)
class JobLimits:
    max_parameters: int
    max_hidden_layers: int
    max_epoch_rows: int
    # Most data-parallel workers of one job; the trainer knows how many it can start.
    max_world_size: int = 4

    @classmethod
    def from_settings(cls, settings: Any) -> JobLimits:
        return cls(**{f.name: int(getattr(settings, f.name)) for f in fields(cls)})

    @classmethod
    def defaults(cls) -> JobLimits:
        return cls(**{f.name: int(TrainerSettings.model_fields[f.name].default) for f in fields(cls)})

    def to_fields(self) -> dict[str, str]:
        return {key: str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes]) -> JobLimits:
        """Limits as a trainer published them; any missing one keeps its default."""
        published = {key.decode(): int(value) for key, value in raw.items()}
        return cls(**{f.name: published.get(f.name, getattr(cls.defaults(), f.name)) for f in fields(cls)})


def _linear_chain(widths: list[int]) -> int:
    """Weights and biases of fully connected layers through these widths."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=False))


def parameter_count(family: str, architecture: str, hidden: list[int], in_shape: list[int] | None,
                    outputs: int) -> int:  # fmt: skip
    """The trainable parameters of the network a job builds (as services/<family>/training.py builds it).

    With `in_shape` None (an upload no trainer has parsed yet) the layers that read the input are
    left out, so the count is a lower bound; with `outputs` unknown, pass 1.
    """
    if family == "dense" and architecture == "cnn":
        channels = hidden[0]
        if in_shape is None:
            return 2 * 9 * channels * channels
        in_channels, height, width = in_shape
        convs = (9 * in_channels * channels + channels) + (9 * channels * 2 * channels + 2 * channels)
        return convs + _linear_chain([2 * channels * (height // 2) * (width // 2), outputs])
    if family == "dense" and architecture == "gru":
        size = hidden[0]
        features = in_shape[-1] if in_shape else 0
        return 3 * (features * size + size * size + 2 * size) + _linear_chain([size, outputs])
    if family == "gnn" and architecture == "lightgcn":
        # One embedding of hidden[0] per node (in_shape: [nodes]); its layers only propagate.
        return (in_shape[-1] if in_shape else 0) * hidden[0]
    if family == "gnn":
        # GCN: len(hidden) + 1 graph convolutions, every hidden one as wide as hidden[0].
        widths = [hidden[0]] * len(hidden) + [outputs]
        return _linear_chain(widths if in_shape is None else [in_shape[-1], *widths])
    # An MLP: dense "mlp", and nlp's "mlp" and "linear" heads (a linear head has no hidden layer).
    widths = [*(hidden if architecture != "linear" else []), outputs]
    return _linear_chain(widths if in_shape is None else [math.prod(in_shape), *widths])


def check_job_size(spec: dict[str, Any], limits: JobLimits, in_shape: list[int] | None, outputs: int,
                   rows: int | None) -> None:  # fmt: skip
    """Refuses a spec whose network or training work is past the limits; unknowns are skipped or
    counted as their smallest possible value, so only a trainer's exact check refuses those."""
    hidden = spec["hidden_sizes"]
    if len(hidden) > limits.max_hidden_layers:
        raise InvalidArgumentError(
            f"hidden_sizes: {len(hidden)} layers; at most {limits.max_hidden_layers} (max_hidden_layers)"
        )
    count = parameter_count(spec["family"], spec["architecture"], hidden, in_shape, max(outputs, 1))
    if count > limits.max_parameters:
        shown = f"{count:,}" if in_shape is not None else f"at least {count:,}"
        raise InvalidArgumentError(
            f"hidden_sizes: {spec['architecture']} {hidden} has {shown} parameters; "
            f"at most {limits.max_parameters:,} (max_parameters)"
        )
    if rows:
        passes = spec["epochs"] * rows * (1 + spec.get("k_folds", 0))
        if passes > limits.max_epoch_rows:
            folds = f" x {1 + spec['k_folds']} (k_folds + 1)" if spec.get("k_folds") else ""
            raise InvalidArgumentError(
                f"epochs: {spec['epochs']} epochs x {rows:,} rows{folds} = {passes:,} rows trained; "
                f"at most {limits.max_epoch_rows:,} (max_epoch_rows)"
            )
