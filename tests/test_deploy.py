"""deploy/k8s: every manifest is what the Kubernetes API accepts, and the pieces fit each other.

No cluster here: built-in kinds are deserialized into the official ``kubernetes`` client models and
serialized back; a misspelled or misplaced field is dropped by that round trip, so it must be
lossless. Custom resources (KServe) and the adapter rule are checked field by field.
"""

import json
from pathlib import Path

import pytest
import yaml

from triton_diffusion.launcher import DEFAULT_MODEL_REPOSITORY

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
MODELS = {"Deployment": "V1Deployment", "Service": "V1Service", "PersistentVolumeClaim": "V1PersistentVolumeClaim",
          "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler"}


def documents(name):
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def by_kind(name):
    return {doc["kind"]: doc for doc in documents(name)}


def round_trip(doc, model_name=None):
    """``doc`` parsed into the API model (as a server response would be) and serialized back."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    model = api.deserialize(json.dumps(doc), model_name or MODELS[doc["kind"]], "application/json")
    return api.sanitize_for_serialization(model)


def normalized(doc):
    """Ports and quantities as the API serializes them (ints stay ints; YAML already has them)."""
    return json.loads(json.dumps(doc))


@pytest.mark.parametrize("doc", documents("triton-diffusion.yaml"), ids=lambda d: d["kind"])
def test_built_in_kinds_round_trip_through_the_api_models(doc):
    assert round_trip(doc) == normalized(doc)


def test_a_misspelled_field_would_be_caught():
    deployment = by_kind("triton-diffusion.yaml")["Deployment"]
    broken = json.loads(json.dumps(deployment))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert round_trip(broken) != normalized(broken)


def test_the_pieces_fit_together():
    kinds = by_kind("triton-diffusion.yaml")
    deployment, service, hpa = kinds["Deployment"], kinds["Service"], kinds["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}  # the launcher's defaults
    assert {port["targetPort"] for port in service["spec"]["ports"]} == set(ports)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the pod listens beyond loopback: the launcher requires the admin key, here from a Secret
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["TRITON_DIFFUSION_ADDRESS"] == "0.0.0.0"
    key_dir = str(Path(env["TRITON_DIFFUSION_ADMIN_KEY_FILE"]).parent)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == key_dir]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "triton-diffusion-admin" and mount["readOnly"]
    mounts = {mount["name"] for mount in container["volumeMounts"]}
    assert mounts == {volume["name"] for volume in pod["spec"]["volumes"]}
    models = next(env["value"] for env in container["env"] if env["name"] == "TRITON_DIFFUSION_MODELS")
    assert all((DEFAULT_MODEL_REPOSITORY / model / "config.pbtxt").is_file() for model in models.split(","))
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    # The HPA's metric is the one the Prometheus adapter rule publishes, from Triton's queue counter.
    rule = yaml.safe_load((DEPLOY / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"] and "nv_inference_count" in rule["metricsQuery"]


def test_the_kserve_runtime_serves_the_inference_service():
    kinds = by_kind("kserve.yaml")
    runtime, service = kinds["ServingRuntime"], kinds["InferenceService"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {fmt["name"] for fmt in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    container = runtime["spec"]["containers"][0]
    assert container["name"] == "kserve-container"
    args = container["args"]
    assert args[args.index("--model-repository") + 1] == "/mnt/models"  # where KServe mounts storageUri
    assert str(container["ports"][0]["containerPort"]) == args[args.index("--http-port") + 1]
    # The runtime's container is a plain V1Container: check it with the API model too.
    assert round_trip(container, "V1Container") == normalized(container)
