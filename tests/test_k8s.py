"""The Kubernetes deployment: generated files match their sources, every overlay renders with
kubectl's kustomize, core resources validate against Kubernetes schemas offline, and the
RayService's serveConfigV2 is a valid Ray Serve deploy config whose app builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serving.k8s import KUBERNETES, rendered_files
from serving.config import ServiceConfig

CORE_KINDS = {"Service", "ConfigMap", "Namespace", "Deployment", "Ingress"}
CRD_KINDS = {"RayService", "PodMonitor", "PrometheusRule"}


def test_generated_files_match_their_sources():
    stale = [str(path.relative_to(KUBERNETES)) for path, content in rendered_files().items()
             if not path.exists() or path.read_text() != content]
    assert not stale, f"re-run `ditserve k8s render --all`; these drifted from their sources: {stale}"


def kustomize(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed: .ci/run must install it")
        pytest.skip("kubectl not installed")
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=["dev", "prod", "prod-4gpu"])
def rendered(request):
    return request.param, kustomize(request.param)


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def test_overlay_renders_the_expected_resources(rendered):
    overlay, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "Service", "PodMonitor", "PrometheusRule", "ConfigMap"} <= kinds
    assert kinds <= CORE_KINDS | CRD_KINDS
    if overlay.startswith("prod"):
        assert {"Ingress", "Deployment"} <= kinds  # the Ingress and Redis for GCS fault tolerance


def test_core_resources_validate_offline(rendered):
    _, docs = rendered
    checked = 0
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, "1.32.0", strict=True)
            checked += 1
    assert checked >= 2


def serve_config_of(docs) -> dict:
    [service] = by_kind(docs, "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_serve_config_is_valid_for_ray_serve_and_its_app_builds(rendered):
    _, docs = rendered
    config = serve_config_of(docs)
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    [app] = schema.applications
    module_name, attribute = app.import_path.split(":")
    builder = getattr(__import__(module_name, fromlist=[attribute]), attribute)
    application = builder(app.args)  # validates the inline config and binds the whole graph
    assert type(application).__name__ == "Application"


def test_cluster_shape(rendered):
    overlay, docs = rendered
    [service] = by_kind(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no model replica on the head
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"denoiser", "encode-decode"}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert container["readinessProbe"] and container["livenessProbe"]

    # Every custom resource a deployment asks for is offered by the group meant to run it.
    offered = {name: json.loads(json.loads(g["rayStartParams"]["resources"])) for name, g in groups.items()}
    offered["head"] = json.loads(json.loads(head["rayStartParams"]["resources"]))
    args = serve_config_of(docs)["applications"][0]["args"]["config"]
    stages = args["stages"]
    assert set(stages["denoiser"]["resources"]) <= set(offered["denoiser"])
    assert set(stages["text_encoder"]["resources"]) <= set(offered["encode-decode"])
    assert set(stages["vae_decoder"]["resources"]) <= set(offered["encode-decode"])
    assert set(args["server"]["resources"]) <= set(offered["head"])

    gpu_limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
                  for g in groups.values()]
    if overlay == "dev":
        assert args["model"]["preset"] == "tiny" and gpu_limits == [None, None]
    else:
        # A Denoiser replica's gang (one bundle of num_gpus per rank, STRICT_PACK) fits one pod.
        degree = ServiceConfig.model_validate(args).stages.denoiser.parallel.degree
        assert args["model"]["preset"].startswith("wan2.1") and gpu_limits == [str(degree), "1"]
        assert stages["denoiser"]["num_gpus"] == 1
        denoiser = groups["denoiser"]
        assert denoiser["rayStartParams"]["num-gpus"] == str(degree)
        assert offered["denoiser"]["ditserve_denoiser"] >= degree * stages["denoiser"]["resources"]["ditserve_denoiser"]
        assert (overlay == "prod-4gpu") == (degree == 4)
        for group in groups.values():
            spec = group["template"]["spec"]
            assert spec["nodeSelector"] and spec["tolerations"]
            assert any(v.get("persistentVolumeClaim") for v in spec["volumes"])  # the model folder
        assert cluster["gcsFaultToleranceOptions"]["redisAddress"]
        env_from = head["template"]["spec"]["containers"][0]["envFrom"]
        assert env_from == [{"secretRef": {"name": "ditserve-secrets"}}]  # job store URL, bucket


def test_monitoring_objects(rendered):
    _, docs = rendered
    monitors = by_kind(docs, "PodMonitor")
    assert {m["spec"]["selector"]["matchLabels"]["ray.io/node-type"] for m in monitors} == {"head", "worker"}
    assert all(m["spec"]["podMetricsEndpoints"][0]["port"] == "metrics" for m in monitors)
    [rule] = by_kind(docs, "PrometheusRule")
    assert {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]} == {
        "DitserveQueueWaitOverSLO", "DitserveJobFailureRate", "DitserveNoHealthyDenoiser"}
    [dashboard] = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("grafana-dashboard")]
    assert json.loads(dashboard["data"]["ditserve-dashboard.json"])["uid"] == "ditserve"


def test_render_refuses_paths_that_mean_nothing_in_a_pod(tmp_path):
    config = tmp_path / "ditserve.yaml"
    config.write_text("storage:\n  job_store_url: sqlite:///jobs.db\n  artifacts_url: s3://b/v\n")
    result = subprocess.run([sys.executable, "-m", "serving.cli", "k8s", "render", "--config", str(config)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "storage.job_store_url is a relative path" in result.stderr


def test_api_keys_are_on_and_come_from_a_secret(rendered):
    """Both overlays serve with auth on; the head pod (Gateway) gets the key hashes from a
    Secret, and those replace the placeholder that no key matches."""
    from serving.auth import ApiKeys, AuthError, key_digest
    from serving.config import config_from_dict

    overlay, docs = rendered
    args = serve_config_of(docs)["applications"][0]["args"]["config"]
    assert args["auth"]["enabled"] is True
    [service] = by_kind(docs, "RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    secrets = [source["secretRef"]["name"] for source in head["envFrom"]]
    assert secrets

    key = "dsk-from-the-secret"
    from_secret = {"DITSERVE_AUTH__KEYS": f"[{{name: me, sha256: {key_digest(key)}}}]"}
    keys = ApiKeys(config_from_dict(args, source=f"{overlay} serveConfigV2", environ=from_secret).auth)
    assert keys.authenticate(f"Bearer {key}").name == "me"
    with pytest.raises(AuthError):  # without the Secret nobody gets in
        ApiKeys(config_from_dict(args, source=f"{overlay} serveConfigV2", environ={}).auth).authenticate(f"Bearer {key}")
    if overlay == "prod":
        example = yaml.safe_load((KUBERNETES / "overlays/prod/secret.example.yaml").read_text())
        assert example["metadata"]["name"] in secrets
        assert {"DITSERVE_AUTH__KEYS", "DITSERVE_WEBHOOKS__SECRET"} <= set(example["stringData"])


def test_the_head_kills_unhealthy_replicas_rather_than_draining_them(rendered):
    """The Serve controller runs on the head: its env carries serving/cluster_env.py's, as every
    cluster `ditserve serve` starts does, so a hung Denoiser does not hold its GPU for its drain."""
    from serving.cluster_env import SERVE_CLUSTER_ENV

    _, docs = rendered
    [service] = by_kind(docs, "RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in head.get("env", [])}
    assert SERVE_CLUSTER_ENV.items() <= env.items()
