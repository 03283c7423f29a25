"""Data-parallel jobs on Kubernetes: the trainer creates a Kubeflow PyTorchJob (kubeflow.org/v1) whose pods run
the same worker module as torchrun does locally (shared.ddp_worker), with the official `kubernetes` client.

The training operator starts one Master and world_size - 1 Worker pods, sets MASTER_ADDR, MASTER_PORT,
RANK and WORLD_SIZE in each, restarts a failed pod (restartPolicy OnFailure, up to backoffLimit) and deletes
the pods when the job ends (cleanPodPolicy All). The pods mount the trainer's checkpoint PVC (ReadWriteMany),
where they read the job's data and rank 0 writes the checkpoint and the progress lines the trainer relays.
The trainer's ServiceAccount may only create, get, watch and delete pytorchjobs in its namespace
(deploy/k8s/components/pytorchjobs).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from shared.errors import UnavailableError

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


def job_name(job_id: str) -> str:
    """A DNS-1035 label from the job id: maas-<id>, lower case, at most 63 characters."""
    return ("maas-" + re.sub(r"[^a-z0-9-]", "-", job_id.lower()))[:63].rstrip("-")


def render_pytorchjob(
    *, name: str, namespace: str, job_id: str, family: str, image: str, world_size: int, worker_args: list[str],
    max_restarts: int, checkpoints_claim: str, models_claim: str, keys_secret: str = "", keys_dir: str = "",
    checkpoint_dir: str = "/checkpoints", model_store: str = "/models", cpu: str = "2", memory: str = "4Gi",
    gpus: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """The PyTorchJob of one attempt: a Master (rank 0) and world_size - 1 Workers, hardened like every maas pod.
    The volumes are mounted where the trainer has them, so the paths in worker_args hold in the pods too."""
    resources: dict[str, Any] = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = gpus
    mounts = [
        {"name": "checkpoints", "mountPath": checkpoint_dir},
        {"name": "models", "mountPath": model_store, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": checkpoints_claim}},
        {"name": "models", "persistentVolumeClaim": {"claimName": models_claim, "readOnly": True}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if keys_secret and keys_dir:  # the stores are encrypted: the workers seal the checkpoint as the trainer does
        mounts.append({"name": "keys", "mountPath": keys_dir, "readOnly": True})  # where the trainer has them
        volumes.append({"name": "keys", "secret": {"secretName": keys_secret}})
    labels = {"app.kubernetes.io/name": f"maas-{family}-ddp-worker", "app.kubernetes.io/component": "ddp-worker",
              "app.kubernetes.io/part-of": "maas", "maas.dev/job-id": job_name(job_id)}  # fmt: skip

    def replicas(count: int) -> dict[str, Any]:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},  # fmt: skip
                    "containers": [{
                        "name": "pytorch",  # the name the training operator looks for
                        "image": image,
                        "command": ["python", "-m", "shared.ddp_worker", *worker_args],
                        "env": [{"name": "OMP_NUM_THREADS", "value": cpu if cpu.isdigit() else "1"}],
                        "ports": [{"name": "pytorchjob-port", "containerPort": 23456}],
                        "resources": resources,
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},  # fmt: skip
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        }  # fmt: skip

    specs = {"Master": replicas(1)}
    if world_size > 1:
        specs["Worker"] = replicas(world_size - 1)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "All", "backoffLimit": max_restarts},
            "pytorchReplicaSpecs": specs,
        },
    }


class PyTorchJobRun:
    """One attempt's PyTorchJob, read through the API: its conditions say when it ended and how."""

    def __init__(self, api: Any, namespace: str, name: str) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.message = ""

    def poll(self) -> int | None:
        job = self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)
        for condition in (job.get("status") or {}).get("conditions") or []:
            if condition.get("status") != "True":
                continue
            if condition.get("type") == "Succeeded":
                return 0
            if condition.get("type") == "Failed":
                self.message = condition.get("message") or condition.get("reason") or ""
                return 1
        return None

    def stop(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:  # the operator deletes the pods with it
            self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name,
                                                     propagation_policy="Foreground")  # fmt: skip
        except ApiException as exc:
            if exc.status != 404:
                raise

    def failure(self, code: int) -> str:
        return f"PyTorchJob {self.namespace}/{self.name} failed: {self.message or 'no reason given'}"


class PyTorchJobLauncher:
    """Creates a job's PyTorchJob; the trainer's checkpoint_dir is the checkpoints PVC, mounted at the same path."""

    def __init__(self, api: Any, family: str, namespace: str, image: str, checkpoints_claim: str,
                 models_claim: str, keys_secret: str = "", max_restarts: int = 3,
                 rendezvous_timeout_s: float = 120.0, cpu: str = "2", memory: str = "4Gi",
                 gpus: int = 0) -> None:  # fmt: skip
        self.api = api
        self.family = family
        self.namespace = namespace
        self.image = image
        self.checkpoints_claim = checkpoints_claim
        self.models_claim = models_claim
        self.keys_secret = keys_secret
        self.max_restarts = max_restarts
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.cpu, self.memory, self.gpus = cpu, memory, gpus

    @classmethod
    def from_settings(cls, family: str, settings: Any) -> PyTorchJobLauncher:
        from kubernetes import client, config

        config.load_incluster_config()  # the trainer's ServiceAccount token
        return cls(client.CustomObjectsApi(), family, settings.kubernetes_namespace, settings.kubernetes_image,
                   settings.kubernetes_checkpoints_claim, settings.kubernetes_models_claim,
                   settings.kubernetes_keys_secret, settings.max_worker_restarts, settings.rendezvous_timeout_s,
                   settings.kubernetes_worker_cpu, settings.kubernetes_worker_memory,
                   settings.kubernetes_worker_gpus)  # fmt: skip

    def render(self, job_id: str, world_size: int, args: list[str]) -> dict[str, Any]:
        return render_pytorchjob(
            name=job_name(job_id), namespace=self.namespace, job_id=job_id, family=self.family, image=self.image,
            world_size=world_size, worker_args=args, max_restarts=self.max_restarts,
            checkpoints_claim=self.checkpoints_claim, models_claim=self.models_claim, keys_secret=self.keys_secret,
            keys_dir=_value(args, "--keys-dir"),
            checkpoint_dir=str(Path(_value(args, "--job-dir") or "/checkpoints/job").parent),
            model_store=_value(args, "--store") or "/models", cpu=self.cpu, memory=self.memory, gpus=self.gpus,
        )  # fmt: skip

    def start(self, job_id: str, job_dir: Path, world_size: int, backend: str, args: list[str]) -> PyTorchJobRun:
        from kubernetes.client.exceptions import ApiException

        if backend == "nccl" or self.gpus:
            args = [*_without(args, "--backend"), "--backend", "nccl" if self.gpus else "gloo"]
        body = self.render(job_id, world_size, args)
        run = PyTorchJobRun(self.api, self.namespace, body["metadata"]["name"])
        try:
            self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            # An earlier attempt's (its trainer died): replaced, so one group alone trains the job.
            log.warning("job %s: replacing the PyTorchJob of an earlier attempt", job_id)
            run.stop()
            self._create_once_deleted(body)
        log.info("job %s: PyTorchJob %s/%s with %d workers", job_id, self.namespace, run.name, world_size)
        return run

    def _create_once_deleted(self, body: dict[str, Any], attempts: int = 60) -> None:
        """Creates `body` once the deletion of the one of the same name has gone through (it is not instant)."""
        from kubernetes.client.exceptions import ApiException

        for _ in range(attempts):
            try:
                self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
            time.sleep(1.0)
        raise UnavailableError(f"PyTorchJob {body['metadata']['name']}: an earlier attempt's is still being deleted")


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1] if flag in args[:-1] else ""


def _without(args: list[str], flag: str) -> list[str]:
    """args with `flag` and its value left out."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        else:
            out.append(arg)
    return out
