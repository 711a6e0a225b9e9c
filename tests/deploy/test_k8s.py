"""deploy/k8s: the kustomize base and the GPU and vLLM overlays build; every object validates against the
Kubernetes schemas; the RayCluster has the shape KubeRay (ray.io/v1) expects; and the pieces agree
with each other and with the code: ports, probes, commands, settings, secrets, network policy.

Offline. kustomize: `kubectl kustomize` (kubectl embeds kustomize) where kubectl is installed, and
always a composition check in Python (deploy_files.compose_kustomization). Kubernetes schemas: the
kubernetes-validate package, which ships them. The KubeRay CRD schema ships in no package we can
install here, so the RayCluster is checked by a hand-written test of the fields these manifests use
(test_raycluster_shape), and its pod templates against the core PodTemplate schema.
"""

from __future__ import annotations

import subprocess
from urllib.parse import urlsplit

import pytest
import yaml
from deploy_files import (K8S, REPO, compose_kustomization, distillery_envvars, expand_k8s_vars, find,
                          kubectl, kustomize_build, parse_distillery, parse_ray_start, pod_containers,
                          pod_templates, read_env_file, with_example_secrets)

from services.settings import ENV_NAMES, Settings
from teacher_server.serve import DEFAULT_PORT as TEACHER_PORT

# Native gRPC probes are GA from 1.27; check an older supported minor and the newest shipped.
K8S_VERSIONS = ("1.29", "1.37")
OVERLAYS = ("base", "overlays/gpu", "overlays/vllm")
GPU_OVERLAYS = ("overlays/gpu", "overlays/vllm")  # the student workers on GPUs in both
NS = "distillery"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return with_example_secrets(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def renders(tree) -> dict[str, list[dict]]:
    """Objects of each kustomization: kustomize's rendering when kubectl is here, else ours."""
    build = kustomize_build if kubectl() else compose_kustomization
    return {overlay: build(tree / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request, renders) -> tuple[str, list[dict]]:
    return request.param, renders[request.param]


@pytest.fixture(scope="module", params=GPU_OVERLAYS)
def gpu(request, renders) -> list[dict]:
    return renders[request.param]


@pytest.fixture(scope="module")
def vllm(renders) -> list[dict]:
    return renders["overlays/vllm"]


@pytest.fixture(scope="module")
def base(renders) -> list[dict]:
    return renders["base"]


# ---------------------------------------------------------------------- builds and schemas
@pytest.mark.skipif(kubectl() is None, reason="kubectl (with its embedded kustomize) is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_builds_and_our_composition_agrees(tree, renders, overlay):
    ours = compose_kustomization(tree / overlay)
    theirs = renders[overlay]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, ours)) == sorted(map(key, theirs))
    for doc in theirs:  # the same images, commands and resources after patches
        mine = next(d for d in ours if key(d) == key(doc))
        assert list(pod_containers(mine)) == list(pod_containers(doc)), key(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_composition_resources_and_patch_targets_exist(tree, overlay):
    docs = compose_kustomization(tree / overlay)  # asserts files exist and patches hit objects
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {NS}


def test_secret_env_files_are_ignored_and_examples_marked():
    for example in (K8S / "base" / "secrets").glob("*.env.example"):
        real = example.with_suffix("")
        ignored = subprocess.run(["git", "check-ignore", "-q", str(real.relative_to(REPO))], cwd=REPO)
        assert ignored.returncode == 0, f"{real} is not ignored by git"
        for key, value in read_env_file(example).items():
            assert value.startswith("REPLACE"), f"{example}: {key} is not marked as a placeholder"
        assert "REPLACE" in example.read_text().split("\n", 1)[0]


def test_every_object_validates_against_the_kubernetes_schemas(rendered):
    import kubernetes_validate

    _, docs = rendered
    for version in K8S_VERSIONS:
        for doc in docs:
            if doc["apiVersion"].startswith("ray.io/"):
                continue  # custom resource: see test_raycluster_shape
            kubernetes_validate.validate(doc, version, strict=True)


def test_raycluster_pod_templates_validate_as_core_pod_templates(rendered):
    import kubernetes_validate

    _, docs = rendered
    ray = find(docs, "RayCluster", "distillery-ray")
    for where, template in pod_templates(ray):
        for version in K8S_VERSIONS:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                          "metadata": {"name": where.replace("/", "-")},
                                          "template": template}, version, strict=True)


def test_strict_schema_validation_is_not_vacuous(base):
    import kubernetes_validate

    teacher = yaml.safe_load(yaml.safe_dump(find(base, "Deployment", "distillery-teacher")))
    teacher["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(teacher, K8S_VERSIONS[0], strict=True)


def test_raycluster_shape(rendered):
    """Hand-written check of a KubeRay ray.io/v1 RayCluster (no CRD schema is available offline):
    the fields used here exist in the CRD, rayStartParams are strings and real `ray start` options,
    the Ray container comes first, replica bounds are coherent, and Ray's version is the image's."""
    import ray

    _, docs = rendered
    rc = find(docs, "RayCluster", "distillery-ray")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert set(spec) <= {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                         "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy",
                         "gcsFaultToleranceOptions"}
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert set(head) <= {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for group in [head, *groups]:
        params = group["rayStartParams"]
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), params
        argv = [f"--{k}={v}" for k, v in params.items()]
        parse_ray_start(["--head", *argv] if group is head else ["--address=ray-head:6379", *argv])
        containers = group["template"]["spec"]["containers"]
        assert containers[0]["image"].split(":")[0].endswith("distillery-services")
        assert "command" not in containers[0] and "args" not in containers[0]  # KubeRay runs `ray start`
    for g in groups:
        assert set(g) <= {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                          "scaleStrategy", "numOfHosts", "idleTimeoutSeconds", "suspend"}
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"


# ---------------------------------------------------------------------- the pieces agree
def test_every_container_has_requests_and_limits(rendered):
    _, docs = rendered
    for doc in docs:
        for container in pod_containers(doc):
            res = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{doc['metadata']['name']}: {kind}"


def test_every_pod_runs_as_non_root(rendered):
    _, docs = rendered
    for doc in docs:
        for where, template in pod_templates(doc):
            sc = template["spec"]["securityContext"]
            assert sc["runAsNonRoot"] and sc["runAsUser"] > 0, where
            for c in template["spec"]["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, where


def test_settings_configmap(base):
    settings = find(base, "ConfigMap", "distillery-settings")["data"]
    assert set(settings) <= set(ENV_NAMES)
    s = Settings.from_env(settings)
    redis = urlsplit(s.redis_url)
    find(base, "Service", redis.hostname)
    assert redis.port == urlsplit(Settings().redis_url).port == 6379
    ray = urlsplit(s.ray_address)
    rc = find(base, "RayCluster", "distillery-ray")
    assert ray.hostname == f"{rc['metadata']['name']}-head-svc"  # the Service KubeRay creates
    head_ports = {p["name"]: p["containerPort"] for p in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ray.port == head_ports["dashboard"] == urlsplit(Settings().ray_address).port
    assert s.api_port == Settings().api_port == 8000
    assert (s.runs_dir, s.model_roots, s.data_roots) == ("/runs", ("/models",), ("/data",))


def test_env_names_are_the_ones_the_code_reads(rendered):
    _, docs = rendered
    known = set(ENV_NAMES) | distillery_envvars()
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for doc in docs:
        for c in pod_containers(doc):
            names = {e["name"] for e in c.get("env", [])}
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    names |= set(secrets[src["secretRef"]["name"]].get("data") or secrets[src["secretRef"]["name"]].get("stringData"))
                else:
                    find(docs, "ConfigMap", src["configMapRef"]["name"])
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in (secrets[ref["name"]].get("data") or {}), ref
            for name in names:
                if name.startswith("DISTILLERY_") or name == "REDIS_URL":
                    assert name in known, f"{c['name']}: {name} is read by nothing"


def _pod_labels(docs, component):
    hits = [t["metadata"]["labels"] for d in docs for _, t in pod_templates(d)
            if t["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(hits) == 1, component
    return hits[0]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_select_pods_and_target_named_ports(rendered):
    _, docs = rendered
    for svc in (d for d in docs if d["kind"] == "Service"):
        pods = [(t, d) for d in docs for _, t in pod_templates(d) if _selects(svc["spec"]["selector"], t["metadata"]["labels"])]
        assert pods, f"Service {svc['metadata']['name']} selects no pod"
        for template, _ in pods:
            named = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                assert named[port["targetPort"]] == port["port"], (svc["metadata"]["name"], port)


def test_teacher_deployment_and_headless_service(rendered):
    overlay, docs = rendered
    svc = find(docs, "Service", "distillery-teacher-headless")
    assert svc["spec"]["clusterIP"] == "None"  # DNS returns every ready replica: client round-robin
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"] == TEACHER_PORT == 50051
    teacher = find(docs, "Deployment", "distillery-teacher")
    pod = teacher["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
    argv = expand_k8s_vars(c["command"], env)
    assert argv[0] == "distillery"
    ctx = parse_distillery(argv[1:])
    p = ctx.params
    assert ctx.command.name == "serve" and p["host"] == "0.0.0.0" and p["port"] == TEACHER_PORT
    assert p["token"] is None and "DISTILLERY_TEACHER_TOKEN" in env  # from the Secret
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": p["port"]}, probe  # grpc.health.v1, service ""
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600  # model load
    assert pod["terminationGracePeriodSeconds"] > p["grace_s"] + p["drain_delay_s"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/models")
    assert mount["readOnly"] and str(p["model"]).startswith("/models/")
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "overlays/vllm":  # one teacher over several GPUs; vLLM refuses --device
        assert p["engine"] == "vllm" and p["device"] is None and not p["compile"]
        assert gpus == c["resources"]["requests"]["nvidia.com/gpu"] == p["tensor_parallel_size"] > 1
        assert c["image"].endswith(":vllm")
    elif overlay == "overlays/gpu":
        assert p["engine"] == "transformers"
        assert p["device"] == "cuda" and gpus == c["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert c["image"].endswith(":gpu")
    else:
        assert p["engine"] == "transformers"
        assert p["device"] == "cpu" and gpus is None


def test_gpu_overlay_gives_student_workers_gpus(gpu, base):
    rc = find(gpu, "RayCluster", "distillery-ray")
    (workers,) = rc["spec"]["workerGroupSpecs"]
    res = workers["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in workers["template"]["spec"]["tolerations"])
    assert "nvidia.com/gpu" not in str(find(base, "RayCluster", "distillery-ray"))
    assert "nvidia.com/gpu" not in str(rc["spec"]["headGroupSpec"])  # the head trains nothing


def test_vllm_overlay_teacher(vllm, renders):
    """`--engine vllm --tensor-parallel-size N` with N GPUs requested, memory-backed /dev/shm for the
    workers (inside the memory limit), a toleration for the GPU taint; the rest of the stack is
    overlays/gpu's."""
    teacher = find(vllm, "Deployment", "distillery-teacher")
    pod = teacher["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    argv = c["command"]
    assert argv[argv.index("--engine") + 1] == "vllm" and "--device" not in argv
    p = parse_distillery(argv[1:]).params
    assert p["tensor_parallel_size"] == 2  # the example; kustomization.yaml says how to change it
    for kind in ("requests", "limits"):
        assert c["resources"][kind]["nvidia.com/gpu"] == p["tensor_parallel_size"], kind
    (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    volume = next(v for v in pod["volumes"] if v["name"] == shm["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    gib = lambda q: int(q.removesuffix("Gi"))  # noqa: E731
    assert 1 <= gib(volume["emptyDir"]["sizeLimit"]) < gib(c["resources"]["limits"]["memory"])
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # everything but the teacher is as in overlays/gpu
    gpu = renders["overlays/gpu"]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, vllm)) == sorted(map(key, gpu))
    for doc in vllm:
        if key(doc) != ("Deployment", "distillery-teacher"):
            assert doc == next(d for d in gpu if key(d) == key(doc)), key(doc)


def test_redis_statefulset_keeps_an_append_only_file_on_a_claim(base):
    sts = find(base, "StatefulSet", "distillery-redis")
    assert find(base, "Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": data_dir} in c["volumeMounts"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["redis"] == 6379


def test_api_and_scheduler(rendered):
    _, docs = rendered
    api = find(docs, "Deployment", "distillery-api")
    (c,) = api["spec"]["template"]["spec"]["containers"]
    assert c["command"][0] == "distillery"
    p = parse_distillery(c["command"][1:]).params
    assert (p["host"], p["port"]) == ("0.0.0.0", 8000)
    assert {q["name"]: q["containerPort"] for q in c["ports"]}["http"] == p["port"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    keys = find(docs, "Secret", "distillery-api-keys")
    assert list(keys.get("data") or keys.get("stringData")) == ["DISTILLERY_API_KEYS"]
    assert {"secretRef": {"name": "distillery-api-keys"}} in c["envFrom"]
    svc = find(docs, "Service", "distillery-api")
    assert svc["spec"]["ports"][0]["port"] == 8000

    sched = find(docs, "Deployment", "distillery-scheduler")
    (c,) = sched["spec"]["template"]["spec"]["containers"]
    assert parse_distillery(c["command"][1:]).command.name == "scheduler"
    assert not any(s.get("secretRef", {}).get("name") == "distillery-api-keys" for s in c.get("envFrom", []))


def _reachable_from_outside(docs, labels: dict, port: int) -> bool:
    """NetworkPolicy semantics for ingress: isolated once any policy selects the pod; then allowed
    only by a rule whose peers include sources outside the namespace (no `from`, an ipBlock or a
    namespaceSelector) and whose ports include `port`."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"
                and _selects(d["spec"]["podSelector"].get("matchLabels", {}), labels)]
    if not policies:
        return True
    for pol in policies:
        for rule in pol["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and port not in {q.get("port") for q in ports}:
                continue
            peers = rule.get("from")
            if peers is None or any("ipBlock" in peer or "namespaceSelector" in peer for peer in peers):
                return True
    return False


def _reachable_from_namespace(docs, labels: dict, port: int) -> bool:
    for pol in (d for d in docs if d["kind"] == "NetworkPolicy"):
        if not _selects(pol["spec"]["podSelector"].get("matchLabels", {}), labels):
            continue
        for rule in pol["spec"].get("ingress", []):
            if rule.get("ports") and port not in {q.get("port") for q in rule["ports"]}:
                continue
            if rule.get("from") is None or any(peer == {"podSelector": {}} for peer in rule["from"]):
                return True
    return False


def test_network_policy_exposes_only_the_api(rendered):
    _, docs = rendered
    assert all(d["metadata"].get("namespace") == NS for d in docs if d["kind"] == "NetworkPolicy")
    for doc in docs:
        for where, template in pod_templates(doc):
            labels = template["metadata"]["labels"]
            for c in template["spec"]["containers"]:
                for port in c.get("ports", []):
                    outside = _reachable_from_outside(docs, labels, port["containerPort"])
                    assert outside == (labels["app.kubernetes.io/component"] == "api"), (where, port)
                    assert _reachable_from_namespace(docs, labels, port["containerPort"]), (where, port)
