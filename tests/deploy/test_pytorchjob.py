"""Distributed jobs on Kubernetes: the PyTorchJob a trainer renders, and the trainer's creation code.

No kube-apiserver is installable here (Debian bookworm packages etcd-server and kubectl, not the API
server), so the creation code runs, through the official `kubernetes` client, against a stand-in API
server on a free port: it serves the pytorchjobs resource of kubeflow.org/v1 in one namespace, validates
every body it is sent against the CRD's schema (deploy/k8s/schemas, a hand-written subset of the public
CRD) and each pod template against Kubernetes' own (kubernetes-validate), and records the verbs used.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
from kubernetes import client

from shared.errors import UnavailableError
from shared.pytorchjob import PyTorchJobLauncher, job_name, render_pytorchjob
from tests.deploy.test_manifests import DEPLOY, render

SCHEMA = json.loads((DEPLOY / "k8s" / "schemas" / "kubeflow.org_pytorchjobs_v1.json").read_text())
ARGS = ["--job-id", "job-0a1b", "--job-dir", "/checkpoints/job-0a1b", "--store", "/models", "--owner", "",
        "--backend", "gloo", "--timeout-s", "120", "--attempt", "tok", "--keys-dir", "/etc/maas/kek",
        "--kek-id", "kek-1"]  # fmt: skip


def check(body: dict) -> None:
    """The CRD's schema for the job, Kubernetes' PodTemplate schema for each replica's pods."""
    jsonschema.Draft202012Validator(SCHEMA).validate(body)
    for replica in body["spec"]["pytorchReplicaSpecs"].values():
        pods = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": replica["template"]}
        kubernetes_validate.validate(pods, "1.33.0", strict=True)


def rendered(world_size: int = 3, **changes) -> dict:
    options = {"name": job_name("job-0A1B"), "namespace": "maas", "job_id": "job-0A1B", "family": "dense",
               "image": "maas-trainer:0.1.0", "world_size": world_size, "worker_args": ARGS, "max_restarts": 3,
               "checkpoints_claim": "maas-checkpoints", "models_claim": "maas-models", "keys_secret": "maas-kek",
               "keys_dir": "/etc/maas/kek", **changes}  # fmt: skip
    return render_pytorchjob(**options)


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_rendered_pytorchjob_validates_against_the_crd_and_pod_schemas(world_size):
    body = rendered(world_size)
    check(body)
    specs = body["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == world_size - 1
    assert body["metadata"]["name"] == "maas-job-0a1b"
    pod = specs["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:3] == ["python", "-m", "shared.ddp_worker"] and container["name"] == "pytorch"
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"checkpoints": "/checkpoints", "models": "/models", "tmp": "/tmp", "keys": "/etc/maas/kek"}


def test_a_gpu_job_asks_each_worker_for_its_gpus_and_still_validates():
    body = rendered(2, gpus=1)
    check(body)
    assert body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["nvidia.com/gpu"] == 1  # fmt: skip


def test_the_schema_refuses_what_the_operator_would_not_run():
    body = rendered(2)
    body["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(body)


def test_the_trainers_role_allows_only_what_the_creation_code_uses():
    docs = render("production")
    roles = [d for d in docs if d["kind"] == "Role"]
    assert [r["metadata"]["name"] for r in roles] == ["maas-trainer-pytorchjobs"]
    assert roles[0]["rules"] == [{"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"],
                                  "verbs": ["create", "get", "watch", "delete"]}]  # fmt: skip
    binding = [d for d in docs if d["kind"] == "RoleBinding"][0]
    assert {s["name"] for s in binding["subjects"]} == {"maas-dense-trainer", "maas-nlp-trainer"}
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    tokens = {d["metadata"]["name"] for d in accounts if d.get("automountServiceAccountToken")}
    assert tokens == {"maas-dense-trainer", "maas-nlp-trainer"}  # no other process gets an API token


class StandInApi:
    """The pytorchjobs resource of one namespace, over HTTP, as the Kubernetes API answers it."""

    PATH = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/(?P<ns>[^/]+)/pytorchjobs(?:/(?P<name>[^/?]+))?")

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self.verbs: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def status(self, code: int, reason: str) -> None:
                self.reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                                  "reason": reason})  # fmt: skip

            def route(self):
                match = StandInApi.PATH.match(self.path)
                if match is None or match["ns"] != "maas":
                    self.status(404, "NotFound")
                    return None
                return match["name"]

            def do_POST(self):
                self.route()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.verbs.append("create")
                try:
                    check(body)
                except Exception as exc:  # noqa: BLE001 - the API server answers 422 to an invalid object
                    self.reply(422, {"kind": "Status", "code": 422, "reason": "Invalid", "message": str(exc)[:500]})
                    return
                name = body["metadata"]["name"]
                if name in api.objects:
                    self.status(409, "AlreadyExists")
                    return
                api.objects[name] = body
                self.reply(201, body)

            def do_GET(self):
                name = self.route()
                api.verbs.append("get")
                if name not in api.objects:
                    self.status(404, "NotFound")
                    return
                self.reply(200, api.objects[name])

            def do_DELETE(self):
                name = self.route()
                api.verbs.append("delete")
                if api.objects.pop(name, None) is None:
                    self.status(404, "NotFound")
                    return
                self.reply(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def set_condition(self, name: str, kind: str, message: str = "") -> None:
        self.objects[name]["status"] = {"conditions": [{"type": kind, "status": "True", "message": message}]}


@pytest.fixture
def api():
    stand_in = StandInApi()
    yield stand_in
    stand_in.server.shutdown()


def launcher_on(api: StandInApi) -> PyTorchJobLauncher:
    configuration = client.Configuration(host=api.url)
    custom = client.CustomObjectsApi(client.ApiClient(configuration))
    return PyTorchJobLauncher(custom, "dense", "maas", "maas-trainer:0.1.0", "maas-checkpoints", "maas-models",
                              keys_secret="maas-kek", max_restarts=2)  # fmt: skip


def test_the_trainer_creates_follows_and_deletes_its_pytorchjob_through_the_kubernetes_client(api):
    launcher = launcher_on(api)
    run = launcher.start("job-0a1b", Path("/checkpoints/job-0a1b"), 2, "gloo", ARGS)
    created = api.objects["maas-job-0a1b"]
    assert created["spec"]["runPolicy"]["backoffLimit"] == 2
    assert created["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert run.poll() is None  # no condition yet: running
    api.set_condition("maas-job-0a1b", "Succeeded")
    assert run.poll() == 0
    run.stop()  # cancellation, or the end of the attempt: the operator deletes the pods with the job
    assert api.objects == {}
    run.stop()  # already gone: nothing to do
    assert set(api.verbs) <= {"create", "get", "watch", "delete"}


def test_a_failed_pytorchjob_says_why_and_an_earlier_attempts_job_is_replaced(api):
    launcher = launcher_on(api)
    first = launcher.start("job-0a1b", Path("/checkpoints/job-0a1b"), 2, "gloo", ARGS)
    api.set_condition(first.name, "Failed", "Master pod maas-job-0a1b-master-0 was OOMKilled")
    assert first.poll() == 1 and "OOMKilled" in first.failure(1)
    # A trainer that takes the job over creates the job again: the old one (its group) is deleted first.
    second = launcher.start("job-0a1b", Path("/checkpoints/job-0a1b"), 2, "gloo", ARGS)
    assert second.poll() is None and api.verbs.count("delete") == 1


def test_an_invalid_body_is_refused_by_the_api_and_surfaces_as_an_error(api, monkeypatch):
    launcher = launcher_on(api)
    monkeypatch.setattr(launcher, "render", lambda *a: {**rendered(2), "kind": "Job"})
    with pytest.raises(client.exceptions.ApiException) as err:
        launcher.start("job-0a1b", Path("/checkpoints/job-0a1b"), 2, "gloo", ARGS)
    assert err.value.status == 422


def test_deletion_that_never_finishes_fails_the_attempt_clearly(api, monkeypatch):
    launcher = launcher_on(api)
    launcher.start("job-0a1b", Path("/checkpoints/job-0a1b"), 2, "gloo", ARGS)
    monkeypatch.setattr("shared.pytorchjob.PyTorchJobRun.stop", lambda self: None)  # a finalizer holds it
    monkeypatch.setattr("shared.pytorchjob.time.sleep", lambda s: None)
    with pytest.raises(UnavailableError, match="an earlier attempt's is still being deleted"):
        launcher.start("job-0a1b", Path("/checkpoints/job-0a1b"), 2, "gloo", ARGS)
