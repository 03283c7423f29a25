"""Job size limits: the parameter count of every trainable architecture, and the checks at submit."""

from __future__ import annotations

import pytest
import torch

from gateway.job_spec import BUILTIN_DATA, normalize
from services.dense import datasets as dense_data
from services.dense.architectures import GRUForecaster, SmallCNN
from services.gnn import datasets as gnn_data
from services.gnn.architectures import GCN
from services.nlp import datasets as nlp_data
from services.nlp.defaults import EMBEDDING_DIM
from shared.errors import InvalidArgumentError
from shared.families import BY_NAME
from shared.job_limits import JobLimits, parameter_count
from shared.settings import TrainerSettings
from shared.training import MLP


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("family", "architecture", "hidden", "in_shape", "outputs", "network"),
    [
        ("dense", "mlp", [128, 64], [64], 10, lambda: MLP(64, [128, 64], 10)),
        ("dense", "mlp", [32], [1, 8, 8], 10, lambda: MLP(64, [32], 10)),
        ("dense", "cnn", [16], [1, 8, 8], 10, lambda: SmallCNN(16, 10, 1, 8, 8)),
        ("dense", "cnn", [8], [3, 7, 5], 4, lambda: SmallCNN(8, 4, 3, 7, 5)),
        ("dense", "gru", [32], [24, 1], 1, lambda: GRUForecaster(1, 32, 1)),
        ("dense", "gru", [16], [10, 3], 5, lambda: GRUForecaster(3, 16, 5)),
        ("gnn", "gcn", [16], [34], 4, lambda: GCN(34, 16, 4, num_layers=2)),
        ("gnn", "gcn", [8, 8, 8], [5], 3, lambda: GCN(5, 8, 3, num_layers=4)),
        ("nlp", "linear", [], [EMBEDDING_DIM], 2, lambda: MLP(EMBEDDING_DIM, [], 2)),
        ("nlp", "linear", [512], [EMBEDDING_DIM], 2, lambda: MLP(EMBEDDING_DIM, [], 2)),  # a linear head ignores it
        ("nlp", "mlp", [128], [EMBEDDING_DIM], 3, lambda: MLP(EMBEDDING_DIM, [128], 3)),
    ],
)  # fmt: skip
def test_the_parameter_count_is_that_of_the_network_the_trainer_builds(
    family, architecture, hidden, in_shape, outputs, network
):
    assert parameter_count(family, architecture, hidden, in_shape, outputs) == trainable(network())
    # Without the input's shape, the count is a lower bound.
    assert parameter_count(family, architecture, hidden, None, 1) <= trainable(network())


def test_every_architecture_of_the_registry_has_a_count():
    for name, family in BY_NAME.items():
        for architecture, hidden in family.architectures.items():
            assert parameter_count(name, architecture, hidden or [8], [1, 8, 8], 2) > 0


def test_the_gateways_facts_of_built_in_data_sets_are_what_the_trainers_load():
    loaders = {"dense": dense_data.load_builtin, "gnn": gnn_data.load_builtin, "nlp": nlp_data.load_builtin}
    seen = set()
    for family, entry in BY_NAME.items():
        for name in entry.builtin_datasets:
            data, facts = loaders[family](name), BUILTIN_DATA[name]
            seen.add(name)
            assert facts.rows == data.num_examples, name
            assert facts.classes == (len(data.class_names) or 1), name
            assert facts.task == data.task, name
            if family == "dense":
                assert facts.shape == list(data.x.shape[1:]), name
            elif family == "gnn" and data.task == "ranking":  # interactions: one "feature" per node
                assert facts.shape == [data.num_users + data.num_items], name
            elif family == "gnn":
                assert facts.shape == [data.node_features.shape[1]], name
            else:
                assert facts.shape is None, name  # nlp models read embeddings, whose width the trainer knows
    assert seen == set(BUILTIN_DATA)


def test_the_default_limits_are_the_trainer_settings_defaults():
    defaults, settings = JobLimits.defaults(), TrainerSettings()
    assert defaults == JobLimits.from_settings(settings)
    assert JobLimits.from_fields({k.encode(): v.encode() for k, v in defaults.to_fields().items()}) == defaults
    assert JobLimits.from_fields({b"max_parameters": b"7"}).max_parameters == 7


def spec(**changes):
    return {"architecture": "mlp", "builtin_dataset": "iris", "output_model": "m", **changes}


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"hidden_sizes": [16384] * 64}, "hidden_sizes: 64 layers; at most 32 (max_hidden_layers)"),
        ({"hidden_sizes": [16384, 16384]}, "hidden_sizes: mlp [16384, 16384] has 268,582,915 parameters; "
                                           "at most 50,000,000 (max_parameters)"),
        ({"architecture": "cnn", "builtin_dataset": "digits-images", "hidden_sizes": [4096]},
         "cnn [4096] has 303,349,770 parameters"),
        ({"architecture": "gru", "builtin_dataset": "sine", "hidden_sizes": [8192]}, "max_parameters"),
    ],
)  # fmt: skip
def test_a_spec_past_the_size_limits_is_refused_at_submit_naming_the_limit(changes, fragment):
    with pytest.raises(InvalidArgumentError) as err:
        normalize(spec(**changes), "dense", None)
    assert fragment in err.value.message


def test_epochs_times_rows_of_a_built_in_set_is_checked_at_submit():
    limits = JobLimits(max_parameters=10**9, max_hidden_layers=32, max_epoch_rows=100_000)
    assert normalize(spec(epochs=666), "dense", None, limits)["epochs"] == 666  # 666 x 150 = 99,900
    with pytest.raises(InvalidArgumentError, match=r"epochs: 667 epochs x 150 rows = 100,050 rows trained; "
                                                   r"at most 100,000 \(max_epoch_rows\)"):  # fmt: skip
        normalize(spec(epochs=667), "dense", None, limits)
    with pytest.raises(InvalidArgumentError, match=r"x 4 \(k_folds \+ 1\) = 100,200 rows trained"):
        normalize(spec(epochs=167, k_folds=3), "dense", None, limits)


def upload(**parsed):
    return {"dataset_id": "ds-1", "family": "dense", "format": "csv", "num_examples": 0, "feature_shape": [],
            "task": "", "class_names": [], **parsed}  # fmt: skip


def test_an_upload_is_checked_with_what_is_known_of_it():
    limits = JobLimits(max_parameters=100_000, max_hidden_layers=32, max_epoch_rows=10_000)
    # Not parsed yet: only the hidden layers count (a lower bound), rows are for the trainer to check.
    normalize(spec(hidden_sizes=[200, 200], epochs=10_000, builtin_dataset=None, dataset_id="ds-1"), "dense",
              upload(), limits)  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="has at least 160,801 parameters"):
        normalize(spec(hidden_sizes=[400, 400], builtin_dataset=None, dataset_id="ds-1"), "dense", upload(), limits)
    # Parsed by a trainer before: its width, classes and rows are known.
    parsed = upload(num_examples=1000, feature_shape=[500], task="classification", class_names=["a", "b"])
    with pytest.raises(InvalidArgumentError, match="mlp \\[200\\] has 100,602 parameters"):
        normalize(spec(hidden_sizes=[200], builtin_dataset=None, dataset_id="ds-1"), "dense", parsed, limits)
    with pytest.raises(InvalidArgumentError, match="11 epochs x 1,000 rows"):
        normalize(spec(hidden_sizes=[8], epochs=11, builtin_dataset=None, dataset_id="ds-1"), "dense", parsed, limits)
