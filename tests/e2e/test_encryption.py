"""The suite's cluster runs on an encrypted store: what is on disk, what serves, and what never reaches
Redis or the logs (inputs, training data), end to end through the gateway."""

from __future__ import annotations

import csv
import json
import re
import uuid
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import redis
import safetensors.torch
import torch
import tritonclient.grpc as triton

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.gnn.v1 import gnn_pb2, gnn_pb2_grpc
from maas.models.v1 import models_pb2, models_pb2_grpc
from maas.nlp.v1 import nlp_pb2, nlp_pb2_grpc
from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from services.dense.datasets import digits_split
from services.dense.runtime import onnx_loader
from services.gnn.runtime import gnn_loader
from services.nlp.runtime import nlp_loader
from shared.envelope import ENVELOPE_MAGIC, SEALED_MAGIC, split_envelope
from shared.keyring import LOCAL_KEK_ID
from shared.model_store import MANIFEST, ModelStore
from shared.onnx_session import OnnxConfig
from shared.tensors import from_numpy, to_numpy
from tests.e2e.test_training import served_version, upload, wait_for, watch
from tests.tolerance import served

NO_STORE = (("cache-control", "no-store"),)
DEFAULT_MODELS = ("digits-mlp", "digits-cnn", "sine-gru", "karate-gcn", "minilm-l6-v2", "sentiment")
# Files that stay plain because they hold nothing secret, and exactly what each may hold.
PLAIN_FILES = {
    "INDEX": re.compile(r"(family (dense|gnn|nlp)\n)(owner [^\n]+\n)?(\d+ [0-9a-f]{64}\n)*"),
    "DEFAULT": re.compile(r"default-version \d+\n"),
    "ACTIVE_KEK": re.compile(r"(active-kek [\w.-]+\n)?(tenant-kek [\w.-]+ [^\n]+\n)*"),
    ".index.lock": re.compile(""),
    ".publish.lock": re.compile(""),
    ".keys.lock": re.compile(""),
}
# Distinctive texts sent in requests and data sets: none may be found in Redis, the logs or the stores.
RUN = uuid.uuid4().hex[:8]
MARKERS = {name: f"zq{name}{RUN}" for name in ("embed", "classify", "oip", "nocache", "jsonl", "comment", "userid")}
TENSOR_MARKER = f"TENSORMK{RUN.upper()}"


def parses(content: bytes) -> list[str]:
    """The formats a file parses as: ONNX, safetensors, JSON or CSV."""
    found = []
    try:
        onnx.load_from_string(content)
        found.append("onnx")
    except Exception:  # noqa: BLE001, S110 - not ONNX is what we want
        pass
    try:
        safetensors.torch.load(content)
        found.append("safetensors")
    except Exception:  # noqa: BLE001, S110
        pass
    try:
        json.loads(content)
        found.append("json")
    except ValueError:
        pass
    try:
        text = content.decode("utf-8")
        csv.Sniffer().sniff(text[:4096])
        rows = list(csv.reader(text.splitlines()))
        if len(rows) > 1 and len({len(row) for row in rows}) == 1 and len(rows[0]) > 1:
            found.append("csv")
    except (UnicodeDecodeError, csv.Error):
        pass
    return found


@pytest.fixture(scope="module")
def training(gateway_channel):
    return training_pb2_grpc.TrainingServiceStub(gateway_channel)


@pytest.fixture(scope="module")
def trained(training, gateway_channel):
    """Data sets carrying marker texts, and jobs trained on them: a CSV with a free-text and an identifier
    column the job drops and masks, and a JSONL of texts."""
    rows = ["user_id,comment,f1,f2,label"]
    rng = np.random.default_rng(0)
    for i in range(120):
        a, b = rng.normal(size=2)
        comment = f'"{MARKERS["comment"]} says, {i}"'
        rows.append(f"{MARKERS['userid']}-{i},{comment},{a:.4f},{b:.4f},{int(a + b > 0)}")
    table = upload(training, "people", t.FAMILY_DENSE, t.DATASET_FORMAT_CSV, ("\n".join(rows) + "\n").encode())
    texts = [f'{{"text": "{MARKERS["jsonl"]} {word} {i}", "label": "{word}"}}' for i in range(20)
             for word in ("good", "bad")]  # fmt: skip
    lines = upload(training, "reviews", t.FAMILY_NLP, t.DATASET_FORMAT_JSONL, ("\n".join(texts) + "\n").encode())
    jobs = {
        "table": training.SubmitJob(
            t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=30, dataset_id=table.dataset_id,
                               output_model="e2e-columns", drop_columns=["comment"], mask_columns=["user_id"]),
            timeout=10,
        ).job,
        "texts": training.SubmitJob(
            t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", epochs=3, dataset_id=lines.dataset_id,
                               output_model="e2e-marker-texts"),
            timeout=10,
        ).job,
    }  # fmt: skip
    for job in jobs.values():
        events = watch(training, job.job_id)
        assert events[-1].state == t.JOB_STATE_SUCCEEDED, events[-1]
    finished = {name: training.GetJob(t.GetJobRequest(job_id=job.job_id), timeout=10).job for name, job in jobs.items()}
    return {"table": table, "lines": lines, "jobs": finished}


def test_no_file_in_the_model_or_data_set_store_parses_as_onnx_safetensors_csv_or_json(cluster, trained):
    checked = {"sealed": 0, "plain": 0}
    for store in ("models", "datasets"):
        for path in sorted((cluster.var_dir / store).rglob("*")):
            if not path.is_file() or ".staging-" in str(path):
                continue
            content = path.read_bytes()
            if path.name in PLAIN_FILES:
                assert PLAIN_FILES[path.name].fullmatch(content.decode()), f"{path}: {content[:200]!r}"
                checked["plain"] += 1
                continue
            assert content.startswith((SEALED_MAGIC, ENVELOPE_MAGIC)), f"{path} is not sealed"
            assert not content.startswith((b"PK\x03\x04", b"{", b"\x08")), path  # npz, JSON, an ONNX proto's head
            assert parses(content) == [], f"{path} parses as {parses(content)}"
            checked["sealed"] += 1
    # The store held everything: every default model, the trained versions and both uploads.
    assert checked["sealed"] >= 2 * len(DEFAULT_MODELS) + 4 + 4 and checked["plain"] >= len(DEFAULT_MODELS)
    # A plain-text data set would have been caught by the same checks.
    assert "csv" in parses(b"a,b,label\n1,2,0\n3,4,1\n") and "json" in parses(b'{"name": "x"}')


def test_the_default_models_serve_from_the_sealed_store_as_they_do_from_the_plain_one(cluster, model_store,
                                                                                      gateway_channel):  # fmt: skip
    sealed_store = ModelStore(cluster.var_dir / "models")
    versions = models_pb2_grpc.ModelServiceStub(gateway_channel)
    for name in DEFAULT_MODELS:
        manifest = (sealed_store.version_dir(name, 1) / MANIFEST).read_bytes()
        assert split_envelope(manifest)[0].kek_id == LOCAL_KEK_ID, name
        listed = versions.ListModelVersions(models_pb2.ListModelVersionsRequest(model_name=name), timeout=10)
        assert [v.state for v in listed.versions if v.version == 1] == [2], name  # MODEL_STATE_READY

    def plain(name, loader):
        manifest = model_store.manifest(name, 1)
        return loader(manifest, model_store.artifacts(manifest))

    cpu = OnnxConfig(device="cpu")
    _, x_test, _, _ = digits_split()
    reply = dense_pb2_grpc.DenseServiceStub(gateway_channel).Predict(
        dense_pb2.PredictRequest(model_name="digits-mlp", model_version=1, inputs={"pixels": from_numpy(x_test[:32])}),
        timeout=30, metadata=NO_STORE,
    )  # fmt: skip
    expected = plain("digits-mlp", onnx_loader(cpu)).predict({"pixels": x_test[:32]})
    np.testing.assert_allclose(to_numpy(reply.outputs["probabilities"], "p"), expected["probabilities"], **served())

    graph = plain("karate-gcn", gnn_loader(torch.device("cpu")))
    reply = gnn_pb2_grpc.GnnServiceStub(gateway_channel).Predict(
        gnn_pb2.PredictRequest(model_name="karate-gcn", model_version=1, stored_graph="karate"), timeout=30,
        metadata=NO_STORE,
    )  # fmt: skip
    np.testing.assert_allclose(to_numpy(reply.outputs["probabilities"], "p"), graph.predict(graph.graphs["karate"]),
                               **served())  # fmt: skip

    texts = ["A man is playing a guitar.", "The weather is awful today."]
    encoders = nlp_loader(model_store, cpu, 128)
    nlp = nlp_pb2_grpc.NlpServiceStub(gateway_channel)
    for name, output in (("minilm-l6-v2", "embedding"), ("sentiment", "probabilities")):
        reply = nlp.Predict(nlp_pb2.PredictRequest(model_name=name, model_version=1, texts=texts), timeout=30,
                            metadata=NO_STORE)  # fmt: skip
        expected = plain(name, encoders).predict(texts)[output]
        np.testing.assert_allclose(to_numpy(reply.outputs[output], output), expected, rtol=1e-4, atol=1e-5)


def test_a_job_drops_and_masks_csv_columns_and_the_model_ignores_the_masked_one(gateway_channel, trained):
    dense = dense_pb2_grpc.DenseServiceStub(gateway_channel)
    version = trained["jobs"]["table"].model_version
    x = np.array([[0.0, 0.5, -0.2], [1e6, 0.5, -0.2], [-7.0, 0.5, -0.2]], np.float32)  # user_id, f1, f2

    def call():
        return dense.Predict.with_call(dense_pb2.PredictRequest(model_name="e2e-columns", model_version=version,
                                                                inputs={"x": from_numpy(x)}), timeout=10)  # fmt: skip

    reply, _ = wait_for(lambda: served_version(call), what="e2e-columns served")
    probabilities = to_numpy(reply.outputs["probabilities"], "p")
    assert probabilities.shape == (3, 2)
    np.testing.assert_array_equal(probabilities[0], probabilities[1])
    np.testing.assert_array_equal(probabilities[0], probabilities[2])
    model = models_pb2_grpc.ModelServiceStub(gateway_channel).GetModel(
        models_pb2.GetModelRequest(model_name="e2e-columns"), timeout=10
    ).model
    assert [list(v.inputs[0].shape) for v in model.versions if v.version == version] == [[-1, 3]]


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"drop_columns": ["nope"]}, "drop_columns: ['nope'] are not columns of"),
        ({"mask_columns": ["label"]}, "mask_columns: 'label' is the label or target column"),
        ({"drop_columns": ["comment"], "mask_columns": ["comment"]}, "are in both"),
        ({"drop_columns": ["user_id", "comment", "f1", "f2"]}, "would drop every feature column"),
    ],
)
def test_columns_a_job_cannot_drop_or_mask_are_refused_at_submit(training, trained, request_fields, message):
    request = t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", output_model="e2e-refused",
                                 dataset_id=trained["table"].dataset_id, **request_fields)  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        training.SubmitJob(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_columns_apply_to_dense_csv_uploads_only(training, trained):
    for request in (
        t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", builtin_dataset="iris", output_model="e2e-x",
                           drop_columns=["sepal"]),
        t.SubmitJobRequest(family=t.FAMILY_NLP, architecture="linear", dataset_id=trained["lines"].dataset_id,
                           output_model="e2e-x", mask_columns=["text"]),
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            training.SubmitJob(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "apply to dense jobs on an uploaded CSV data set" in err.value.details()


def redis_contents(url: str) -> tuple[int, bytes]:
    """(number of keys, every key and every value) of a Redis, whatever their types."""
    client = redis.Redis.from_url(url)
    parts, count = [], 0
    for key in client.scan_iter(count=1000):
        count += 1
        parts.append(key)
        kind = client.type(key)
        if kind == b"string":
            parts.append(client.get(key) or b"")
        elif kind == b"hash":
            parts += [b"%s=%s" % item for item in client.hgetall(key).items()]
        elif kind == b"list":
            parts += client.lrange(key, 0, -1)
        elif kind == b"set":
            parts += list(client.smembers(key))
        elif kind == b"zset":
            parts += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            parts += [b"%s=%s" % item for _, fields in client.xrange(key) for item in fields.items()]
        else:
            raise AssertionError(f"{key!r}: a Redis type this scan does not read: {kind!r}")
    client.close()
    return count, b"\n".join(parts)


def test_inputs_and_training_data_never_reach_redis_the_logs_or_the_stores_in_plain(cluster, gateway_channel,
                                                                                       trained):  # fmt: skip
    nlp = nlp_pb2_grpc.NlpServiceStub(gateway_channel)
    for _ in range(2):  # the second call is answered from the cache
        nlp.Predict(nlp_pb2.PredictRequest(model_name="minilm-l6-v2", texts=[MARKERS["embed"]]), timeout=30)
        nlp.Predict(nlp_pb2.PredictRequest(model_name="sentiment", texts=[f"{MARKERS['classify']} I loved it"]),
                    timeout=30)  # fmt: skip
    nlp.Predict(nlp_pb2.PredictRequest(model_name="sentiment", texts=[MARKERS["nocache"]]), timeout=30,
                metadata=NO_STORE)  # fmt: skip
    with triton.InferenceServerClient(cluster.specs["gateway"].target) as client:
        tensor = triton.InferInput("texts", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([MARKERS["oip"].encode()], dtype=object))
        client.infer("sentiment", [tensor])
    pixels = np.frombuffer((TENSOR_MARKER.encode() * 64)[:256], dtype=np.float32).reshape(1, 64)
    assert np.all(np.isfinite(pixels))
    dense_pb2_grpc.DenseServiceStub(gateway_channel).Predict(
        dense_pb2.PredictRequest(model_name="digits-mlp", inputs={"pixels": from_numpy(pixels)}), timeout=30
    )
    sent = [marker.encode() for marker in MARKERS.values()] + [TENSOR_MARKER.encode()]

    cache_keys, cache = redis_contents(cluster.redis_url)
    queue_keys, queue = redis_contents(cluster.queue_redis_url)
    assert b"maas:v1:result:nlp:sentiment:" in cache and b"maas:jobs:" in queue  # both were in use
    assert cache_keys > 0 and queue_keys > 0
    logs = b"\n".join(path.read_bytes() for path in sorted(Path(cluster.log_dir).glob("*.log")))
    stores = b"\n".join(p.read_bytes() for s in ("models", "datasets") for p in (cluster.var_dir / s).rglob("*")
                        if p.is_file())  # fmt: skip
    for where, content in (("cache Redis", cache), ("queue Redis", queue), ("logs", logs), ("stores", stores)):
        found = [marker.decode() for marker in sent if marker in content]
        assert not found, f"the {where} hold texts that were sent: {found}"
    # What the cache keeps is keyed by a hash of the inputs, never by them.
    assert all(re.fullmatch(rb"maas:v1:result:\w+:[\w.-]+:\d+:(t-[0-9a-f]{16}:)?[0-9a-f]{64}", key) for key in
               redis.Redis.from_url(cluster.redis_url).scan_iter("maas:v1:result:*"))  # fmt: skip
