"""Static checks of deploy/: kustomize renders, the Kubernetes schemas accept, hadolint passes,
and the containers run what `make run` runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gateway.settings import GatewaySettings
from services.dense.settings import DenseSettings
from services.gnn.settings import GnnContentSettings, GnnSettings
from services.nlp.settings import NlpSettings
from shared.cluster import ClusterPorts, process_table
from shared.families import FAMILIES
from shared.settings import trainer_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = ("cpu", "gpu", "production")
GPU_WORKLOADS = {"maas-dense", "maas-gnn", "maas-nlp", "maas-dense-trainer", "maas-gnn-trainer", "maas-nlp-trainer"}
WORKLOADS = GPU_WORKLOADS | {"maas-gateway", "maas-redis-cache", "maas-redis-queue", "maas-models-init"}
SETTINGS = {"dense": DenseSettings, "gnn": GnnSettings, "nlp": NlpSettings, "gateway": GatewaySettings}
# Trainer settings a family reads beside trainer_settings(family)'s, under the same prefix.
TRAINER_EXTRA = {"gnn": GnnContentSettings.model_fields}


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: install it (Debian package kubectl; .ci/run does) to render the overlays")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(request.param)


@pytest.fixture(scope="module")
def gpu():
    return render("gpu")


def pod_specs(objects):
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def config_maps(objects) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj.get("data", {}) for obj in objects if obj["kind"] == "ConfigMap"}


def container_env(objects, container) -> dict[str, str]:
    maps = config_maps(objects)
    env = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    env.update({item["name"]: item.get("value", "") for item in container.get("env", [])})
    return env


def test_every_object_passes_the_kubernetes_schemas(rendered):
    overlay, objects = rendered
    assert len(objects) > 40
    for obj in objects:
        kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_every_model_service_and_trainer_asks_for_exactly_one_gpu(gpu):
    seen = set()
    for name, spec in pod_specs(gpu):
        gpus = [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in spec["containers"]]
        if name in GPU_WORKLOADS:
            seen.add(name)
            assert gpus == [1], name
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        else:
            assert gpus == [None] * len(gpus), f"{name} should not take a GPU"
    assert seen == GPU_WORKLOADS


def test_the_gpu_memory_cap_is_set_through_configuration(gpu):
    maps = config_maps(gpu)
    for family in ("dense", "gnn", "nlp"):
        data = next(d for n, d in maps.items() if n.startswith(f"maas-{family}-"))
        assert int(data[f"MAAS_{family.upper()}_GPU_MEMORY_LIMIT_MB"]) > 0
        assert data[f"MAAS_{family.upper()}_DEVICE"] == "cuda"


def test_probes_point_at_the_port_serving_health(rendered):
    """The server's port, or, with TLS on, the plaintext health port it opens for probes."""
    _, objects = rendered
    for name, spec in pod_specs(objects):
        for container in spec["containers"]:
            if "readinessProbe" not in container or "grpc" not in container["readinessProbe"]:
                continue
            env = container_env(objects, container)
            prefix = f"MAAS_{container['name'].upper()}_"
            health = int(env.get(f"{prefix}HEALTH_PORT", 0)) or int(env[f"{prefix}PORT"])
            declared = {p["containerPort"] for p in container["ports"] if p["name"] in ("grpc", "health")}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    assert container[probe]["grpc"]["port"] == health, (name, probe)
            assert health in declared and int(env[f"{prefix}PORT"]) in declared, name


def test_the_production_overlay_mounts_tls_and_keys_from_secrets():
    objects = render("production")
    gateway = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "maas-gateway")
    pod = gateway["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"maas-gateway-tls", "maas-api-keys", "maas-kek"}
    env = container_env(objects, pod["containers"][0])
    for key in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE", "API_KEYS_FILE"):
        path = env[f"MAAS_GATEWAY_{key}"]
        assert any(path.startswith(m["mountPath"]) for m in pod["containers"][0]["volumeMounts"]), key
    # Nothing secret is committed: no Secret object is rendered, the operator creates them.
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_the_production_overlay_gives_every_store_reader_the_kek_secret():
    """Every process that reads or writes the model or data-set store (services, trainers, the gateway,
    the job that builds the default models) mounts maas-kek read-only and names a KEK inside it."""
    objects = render("production")
    readers = [
        o for o in objects
        if (o["kind"] == "Deployment" and o["metadata"]["name"].startswith("maas-"))
        or (o["kind"] == "Job" and o["metadata"]["name"] == "maas-models-init")
    ]  # fmt: skip
    assert len(readers) >= 8
    for obj in readers:
        pod = obj["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["kek"]["secret"]["secretName"] == "maas-kek", obj["metadata"]["name"]
        container = pod["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "kek")
        assert mount["readOnly"] is True
        env = container_env(objects, container)
        dirs = {k: v for k, v in env.items() if k.endswith("_KEYS_DIR")}
        assert dirs and all(v == mount["mountPath"] for v in dirs.values()), obj["metadata"]["name"]
        for key in dirs:
            assert env[key.replace("_KEYS_DIR", "_KEK_ID")], (obj["metadata"]["name"], key)


def test_pods_run_as_non_root_with_a_read_only_root_filesystem(rendered):
    _, objects = rendered
    names = set()
    for name, spec in pod_specs(objects):
        names.add(name)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["requests"] and container["resources"]["limits"], name
    assert names == WORKLOADS


def test_a_network_policy_selects_every_workload_and_the_default_denies(rendered):
    _, objects = rendered
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    selected = {p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") for p in policies}
    assert WORKLOADS <= selected
    deny = next(p for p in policies if p["metadata"]["name"] == "default-deny")
    assert deny["spec"]["podSelector"] == {} and set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_no_image_is_untagged_or_latest(rendered):
    _, objects = rendered
    for name, spec in pod_specs(objects):
        for container in spec["containers"]:
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), (name, image)


def test_model_services_are_headless_and_scale(rendered):
    _, objects = rendered
    by_kind = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    for family in ("dense", "gnn", "nlp"):
        service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == f"maas-{family}")
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["ports"][0]["name"] == "grpc"
        assert ("HorizontalPodAutoscaler", f"maas-{family}") in by_kind
        assert ("PodDisruptionBudget", f"maas-{family}") in by_kind
        assert ("ServiceAccount", f"maas-{family}") in by_kind
    queue = next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "maas-redis-queue")
    args = queue["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "noeviction" in args and "always" in args and queue["spec"]["volumeClaimTemplates"]


def test_termination_grace_outlasts_the_servers_drain(rendered):
    _, objects = rendered
    for name, spec in pod_specs(objects):
        for container in spec["containers"]:
            grace = [float(v) for k, v in container_env(objects, container).items() if k.endswith("SHUTDOWN_GRACE_S")]
            if grace:
                assert spec["terminationGracePeriodSeconds"] > grace[0], name


def test_containers_run_what_make_run_runs(gpu):
    """One source of truth: every process of shared.cluster's table runs in a container with the
    same command, and every setting `make run` gives it is set there too."""
    specs = process_table(ClusterPorts(), Path("/models"), "redis://cache", "redis://queue", Path("/var"))
    containers = {c["name"]: c for _, spec in pod_specs(gpu) for c in spec["containers"]}
    for spec in specs:
        container = containers[spec.name]
        assert container["command"] == ["python", *spec.command[1:]], spec.name
        env = container_env(gpu, container)
        missing = set(spec.env) - set(env)
        assert not missing, f"{spec.name}: make run sets {sorted(missing)}, the manifests do not"
        for key in ("PORT",):
            matching = [k for k in spec.env if k.endswith(f"_{key}") and "METRICS" not in k]
            for k in matching:
                assert env[k] == spec.env[k], f"{spec.name}: {k} differs"


def test_servers_run_one_worker_per_core_of_their_cpu_limit(rendered):
    _, objects = rendered
    for name, spec in pod_specs(objects):
        if name not in ("maas-gateway", "maas-dense", "maas-gnn", "maas-nlp"):
            continue
        container = spec["containers"][0]
        workers = next(e for e in container["env"] if e["name"].endswith("_WORKERS"))
        field = workers["valueFrom"]["resourceFieldRef"]
        assert field["resource"] == "limits.cpu" and field["containerName"] == container["name"], name
        assert "cpu" in container["resources"]["limits"], name


def test_every_manifest_setting_is_one_the_process_reads(gpu):
    containers = {c["name"]: c for _, spec in pod_specs(gpu) for c in spec["containers"]}
    for name, settings in SETTINGS.items():
        prefix = f"MAAS_{name.upper()}_"
        fields = {f"{prefix}{field.upper()}" for field in settings.model_fields}
        fields |= {"MAAS_GATEWAY_REDIS_URL", "MAAS_GATEWAY_QUEUE_REDIS_URL"}
        fields |= {f"MAAS_GATEWAY_{family.name.upper()}_TARGET" for family in FAMILIES}  # read per registry family
        unknown = {k for k in container_env(gpu, containers[name]) if k.startswith(prefix)} - fields
        assert not unknown, f"{name}: {sorted(unknown)} are not settings"
    for family in ("dense", "gnn", "nlp"):
        prefix = f"MAAS_{family.upper()}_TRAINER_"
        fields = {f"{prefix}{field.upper()}" for field in type(trainer_settings(family)).model_fields}
        fields |= {f"{prefix}{field.upper()}" for field in TRAINER_EXTRA.get(family, {})}
        env = container_env(gpu, containers[f"{family}-trainer"])
        unknown = {k for k in env if k.startswith(prefix)} - fields
        assert not unknown, f"{family}-trainer: {sorted(unknown)} are not settings"


def test_compose_runs_the_same_processes():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    specs = process_table(ClusterPorts(), Path("/models"), "redis://cache", "redis://queue", Path("/var"))
    for spec in specs:
        service = compose[spec.name]
        command = service.get("command")
        if command is not None:
            assert command == ["python", *spec.command[1:]], spec.name
        missing = set(spec.env) - set(service["environment"])
        assert not missing, f"compose {spec.name}: missing {sorted(missing)}"
    assert "noeviction" in compose["redis-queue"]["command"]


@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfiles_are_clean_under_hadolint(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert "USER 10001" in text and 'ENTRYPOINT ["python", "-m",' in text
    assert text.count("FROM ") >= 2  # multi-stage


def test_each_dockerfile_entrypoint_is_a_process_of_the_table():
    modules = {spec.module for spec in process_table(ClusterPorts(), Path("/m"), None, "redis://q", Path("/v"))}
    for dockerfile in (DEPLOY / "docker").glob("*.Dockerfile"):
        entry = dockerfile.read_text().split('ENTRYPOINT ["python", "-m", "')[1].split('"')[0]
        assert entry in modules, dockerfile.name


def test_image_requirements_come_from_the_lock():
    lock = {line.split("==")[0].lower().replace("_", "-") for line in Path("requirements.lock").read_text().split()}
    for requirements in (DEPLOY / "docker" / "requirements").glob("*.in"):
        for line in requirements.read_text().splitlines():
            if line and not line.startswith("#"):
                assert line.lower() in lock, f"{requirements.name}: {line} is not pinned in requirements.lock"


def test_metrics_ports_are_open_to_the_monitoring_namespace_only(rendered):
    _, objects = rendered
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    checked = 0
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if any(port.get("port") == 9464 for port in rule.get("ports", [])):
                peers = rule.get("from", [])
                assert peers, f"{policy['metadata']['name']}: /metrics is open to everyone"
                assert all(
                    peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                    == "monitoring"
                    for peer in peers
                ), policy["metadata"]["name"]
                assert [p["port"] for p in rule["ports"]] == [9464], "another port rides on the metrics rule"
                checked += 1
    assert checked >= 7  # the gateway, three services and three trainers


def test_trainers_have_a_liveness_probe_on_their_metrics_port(rendered):
    """A hung trainer serves no gRPC to probe: its /healthz, beside /metrics, says whether it makes progress."""
    _, objects = rendered
    trainers = {name: spec for name, spec in pod_specs(objects) if name.endswith("-trainer")}
    assert set(trainers) == {"maas-dense-trainer", "maas-gnn-trainer", "maas-nlp-trainer"}
    for name, spec in trainers.items():
        container = spec["containers"][0]
        probe = container["livenessProbe"]["httpGet"]
        assert probe["path"] == "/healthz" and probe["port"] == "metrics", name
        metrics = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
        family = container["name"].removesuffix("-trainer").upper()
        assert int(container_env(objects, container)[f"MAAS_{family}_TRAINER_METRICS_PORT"]) == metrics, name


def test_the_gateway_serves_http_beside_grpc(rendered):
    """The HTTP front's port: set, declared, on the Service, and open like the gRPC port."""
    _, objects = rendered
    gateway = next(c for name, spec in pod_specs(objects) if name == "maas-gateway" for c in spec["containers"])
    port = int(container_env(objects, gateway)["MAAS_GATEWAY_HTTP_PORT"])
    assert {"name": "http", "containerPort": port} in gateway["ports"]
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "maas-gateway")
    assert any(p["name"] == "http" and p["targetPort"] == "http" for p in service["spec"]["ports"])
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "maas-gateway")
    public = [r for r in policy["spec"]["ingress"] if "from" not in r]
    assert any({p["port"] for p in r["ports"]} >= {50051, port} for r in public)


def test_the_dashboard_and_alert_rules_ship_as_config_maps(rendered):
    _, objects = rendered
    maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    dashboard = maps["maas-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["maas.json"])["panels"]
    rules = yaml.safe_load(maps["maas-prometheus-rules"]["data"]["maas-rules.yaml"])
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"MaasHighErrorRatio", "MaasHighP99Latency", "MaasTrainingJobDeadLettered", "MaasBackendDown"} <= alerts
    # The files in the repository are what the ConfigMaps carry.
    assert dashboard["data"]["maas.json"] == (DEPLOY / "grafana" / "maas.json").read_text()
