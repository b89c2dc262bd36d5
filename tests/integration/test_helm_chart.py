"""The Helm chart (deploy/helm/ragbus) lints, renders and passes a strict schema check of every
object, and it declares exactly what the code declares: the topics (names, partitions, configs)
of schemas/topics.py and, per tenant, the ACLs of schemas/tenants.py. One source of truth.

Runs deploy/helm/validate.sh, which builds helm and kubeconform from their Go modules on first use
(cached under ~/.cache/ragbus/tools); skipped only where Go itself is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from inference_workers.config import ModelSpec
from inference_workers.worker.service import COMPONENT as WORKER_COMPONENT
from infra.settings import Settings
from processors.service import AGENT_SUFFIXES, processors_group_id
from schemas.base import LANES
from schemas.tenants import COMPONENTS_USER, SCRAM_MECHANISM, Acl, tenant_acls, tenant_principal
from schemas.topics import SHARED_TOPICS, TENANT_TOPICS, Topics

ROOT = Path(__file__).resolve().parents[2]
HELM_DIR = ROOT / "deploy" / "helm"
CHART = HELM_DIR / "ragbus"
TENANTS = ("acme", "globex")  # deploy/helm/ragbus/ci/tenants-values.yaml
PREFIX = "ragbus"
GO = shutil.which("go") or next((p for p in ("/usr/local/go/bin/go",) if os.access(p, os.X_OK)), None)
TOOLS = Path(os.environ.get("RAGBUS_TOOLS_DIR", Path.home() / ".cache" / "ragbus" / "tools"))

pytestmark = [
    pytest.mark.skipif(
        GO is None, reason="needs Go: the chart check builds helm and kubeconform from Go modules"
    ),
    # The first run compiles helm (minutes on 2 cores); later runs reuse the cached binary.
    pytest.mark.timeout(2400),
]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("helm")
    # No PYTHON: staleness of files/topics.json is test_generated_chart_data_is_current's to report,
    # so that the tests below show what differs.
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"} | {"GO": str(GO)}
    proc = subprocess.run(
        ["bash", str(HELM_DIR / "validate.sh"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=2300,
    )
    (out / "validate.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"validate.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _objects(rendered: Path, name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((rendered / f"{name}.yaml").read_text()) if d]


def _of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def _one(objs: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    found = [o for o in _of_kind(objs, kind) if o["metadata"]["name"] == f"ragbus-{component}"]
    assert len(found) == 1, f"{kind} ragbus-{component}: {len(found)} rendered"
    return found[0]


def test_generated_chart_data_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(HELM_DIR / "generate.py"), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr


def test_every_rendered_object_passes_the_schema_check(rendered: Path) -> None:
    log = (rendered / "validate.log").read_text()
    summary = re.search(
        r"(\d+) resources found in 3 files - Valid: (\d+), Invalid: (\d+), Errors: (\d+), Skipped: (\d+)", log
    )
    assert summary, log
    found, valid, invalid, errors, skipped = map(int, summary.groups())
    total = sum(len(_objects(rendered, n)) for n in ("default", "tenants", "gpu"))
    assert (found, valid, invalid, errors, skipped) == (total, total, 0, 0, 0)
    kinds = {o["kind"] for n in ("default", "tenants", "gpu") for o in _objects(rendered, n)}
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "ScaledObject", "ServiceMonitor"} <= kinds
    assert {"Deployment", "StatefulSet", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert "PersistentVolumeClaim" in kinds


@pytest.mark.parametrize("values", ["tenants", "gpu"])
def test_topics_are_those_of_schemas(rendered: Path, values: str) -> None:
    topics = _of_kind(_objects(rendered, values), "KafkaTopic")
    got = {t["spec"]["topicName"]: (t["spec"]["partitions"], t["spec"]["config"]) for t in topics}
    want = {s.name(PREFIX): (s.partitions, s.configs()) for s in SHARED_TOPICS}
    want |= {s.name(PREFIX, t): (s.partitions, s.configs()) for t in TENANTS for s in TENANT_TOPICS}
    assert got == want
    assert len(topics) == len(want)
    for t in topics:
        assert t["metadata"]["name"] == t["spec"]["topicName"]
        assert t["spec"]["replicas"] == 3
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == "ragbus-kafka"


def test_without_tenants_only_the_shared_topics_and_the_components_user(rendered: Path) -> None:
    objs = _objects(rendered, "default")
    assert sorted(t["spec"]["topicName"] for t in _of_kind(objs, "KafkaTopic")) == sorted(
        Topics(PREFIX).all()
    )
    assert [u["metadata"]["name"] for u in _of_kind(objs, "KafkaUser")] == [COMPONENTS_USER]


def _acls(user: dict[str, Any]) -> list[Acl]:
    pattern = {"literal": "LITERAL", "prefix": "PREFIXED"}
    out = []
    for rule in user["spec"]["authorization"]["acls"]:
        assert rule["type"] == "allow" and rule["host"] == "*"
        res = rule["resource"]
        for op in rule["operations"]:
            out.append(Acl(res["type"].upper(), res["name"], pattern[res["patternType"]], op.upper()))
    return out


def test_tenant_users_have_exactly_the_acls_of_schemas(rendered: Path) -> None:
    objs = _objects(rendered, "tenants")
    users = {u["metadata"]["name"]: u for u in _of_kind(objs, "KafkaUser")}
    assert set(users) == {COMPONENTS_USER, *(tenant_principal(t, PREFIX) for t in TENANTS)}
    for user in users.values():
        assert user["spec"]["authentication"]["type"] == SCRAM_MECHANISM.lower()
    for t in TENANTS:
        assert _acls(users[tenant_principal(t, PREFIX)]) == tenant_acls(t, PREFIX)
    # The components' user has no ACLs of its own: it is the cluster's super user.
    assert "authorization" not in users[COMPONENTS_USER]["spec"]
    (kafka,) = _of_kind(objs, "Kafka")
    assert kafka["spec"]["kafka"]["authorization"] == {"type": "simple", "superUsers": [COMPONENTS_USER]}
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert listener["authentication"]["type"] == SCRAM_MECHANISM.lower() and listener["tls"] is True


def test_keda_scales_on_the_groups_and_topics_the_code_consumes(rendered: Path) -> None:
    objs = _objects(rendered, "tenants")
    settings = Settings(topic_prefix=PREFIX)
    worker = _one(objs, "ScaledObject", "worker")
    assert {
        (tr["metadata"]["consumerGroup"], tr["metadata"]["topic"]) for tr in worker["spec"]["triggers"]
    } == {(f"{PREFIX}.{WORKER_COMPONENT}", Topics(PREFIX).enriched(lane)) for lane in LANES}
    processors = _one(objs, "ScaledObject", "processors")
    assert {
        (tr["metadata"]["consumerGroup"], tr["metadata"]["topic"]) for tr in processors["spec"]["triggers"]
    } == {
        (processors_group_id(settings), s.name(PREFIX, t))
        for t in TENANTS
        for s in TENANT_TOPICS
        if s.suffix in AGENT_SUFFIXES.values()
    }
    for so in (worker, processors):
        target = so["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "StatefulSet")
        assert "replicas" not in _one(objs, "StatefulSet", target["name"][len("ragbus-") :])["spec"]


def _env(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_components_settings_are_real_settings(rendered: Path) -> None:
    """Every RAGBUS_* name the chart sets is a setting, and the shared ones load as Settings."""
    objs = _objects(rendered, "gpu")
    (config,) = [c for c in _of_kind(objs, "ConfigMap") if c["metadata"]["name"] == "ragbus-env"]
    names = {k for k in config["data"] if k.startswith("RAGBUS_")}
    for d in _of_kind(objs, "Deployment") + _of_kind(objs, "StatefulSet"):
        names |= {k for k in _env(d) if k.startswith("RAGBUS_")}
    fields = {f"RAGBUS_{f.upper()}" for f in Settings.model_fields}
    assert names - fields == set()
    shared = {k[len("RAGBUS_") :].lower(): v for k, v in config["data"].items() if k.startswith("RAGBUS_")}
    s = Settings(**shared, kafka_sasl_password="x")
    assert s.bootstrap == "ragbus-kafka-kafka-bootstrap:9093"
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism, s.kafka_sasl_username) == (
        "SASL_SSL",
        SCRAM_MECHANISM,
        COMPONENTS_USER,
    )
    assert not s.uses_milvus_lite


def test_gpu_worker_requests_gpus_and_serves_vllm_from_the_model_volume(rendered: Path) -> None:
    objs = _objects(rendered, "gpu")
    worker = _one(objs, "StatefulSet", "worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = _env(worker)
    assert env["RAGBUS_LLM_BACKEND"] == "vllm"
    models = [ModelSpec.model_validate(m) for m in json.loads(env["RAGBUS_LLM_MODELS"])]
    assert [m.backend for m in models] == ["vllm"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True and models[0].model.startswith(
        mounts["models"]["mountPath"] + "/"
    )
    claim = _one(objs, "PersistentVolumeClaim", "models")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # Without values-gpu.yaml the worker asks for no GPU.
    cpu = _one(_objects(rendered, "tenants"), "StatefulSet", "worker")
    assert "nvidia.com/gpu" not in json.dumps(cpu)


def test_metrics_need_a_key_and_prometheus_scrapes_with_one(rendered: Path) -> None:
    """/metrics is not public by default: the gateway asks for an API key, and the ServiceMonitor
    sends one from a Secret as a bearer token."""
    objs = _objects(rendered, "default")
    assert _env(_one(objs, "Deployment", "gateway"))["RAGBUS_GATEWAY_METRICS"] == "key"
    (monitor,) = _of_kind(objs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "ragbus-gateway-metrics-key", "key": "key"},
    }


def test_batches_and_quotas_give_every_gateway_replica_shared_state(rendered: Path, tmp_path: Path) -> None:
    """With quotas and the Batch API on, every gateway replica connects as the gateway's own
    Postgres role (DSN from a Secret) and mounts one ReadWriteMany claim where the code keeps batch
    files, results and job state (producers/gateway/batches.py, producers/bulk/state.py), so any
    replica resumes any batch; by default both are off and nothing of it renders."""
    default = _objects(rendered, "default")
    assert "RAGBUS_GATEWAY_BATCHES" not in _env(_one(default, "Deployment", "gateway"))
    assert _of_kind(default, "PersistentVolumeClaim") == []

    objs = _objects(rendered, "tenants")
    gateway = _one(objs, "Deployment", "gateway")
    env = _env(gateway)
    assert env["RAGBUS_GATEWAY_QUOTAS"] == "true" and env["RAGBUS_GATEWAY_BATCHES"] == "true"
    assert env["RAGBUS_PG_GATEWAY_DSN"] == {"secretKeyRef": {"name": "ragbus-postgres-gateway", "key": "dsn"}}
    claim = _one(objs, "PersistentVolumeClaim", "batches")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = gateway["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "batch-data"]
    assert volume["persistentVolumeClaim"]["claimName"] == "ragbus-batches"
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["subPath"] for m in container["volumeMounts"] if m["name"] == "batch-data"}
    # Where the code puts them, relative to the chart's RAGBUS_HOME.
    (config,) = [c for c in _of_kind(objs, "ConfigMap") if c["metadata"]["name"] == "ragbus-env"]
    home = Path(config["data"]["RAGBUS_HOME"])
    from producers.bulk.state import JobStore
    from producers.gateway.batches import files_dir, results_path

    local = tmp_path / "home"
    kept = (files_dir(local, "acme"), results_path(local, "acme", "b").parent, JobStore(local, "acme").dir)
    wanted = {home / path.relative_to(local).parts[0] for path in kept}
    assert {Path(p) for p in mounts} == wanted, mounts
    assert all(Path(p).name == sub for p, sub in mounts.items())


def test_a_tenant_name_kubernetes_cannot_hold_is_refused(rendered: Path) -> None:
    helm = next(TOOLS.glob("helm-*/helm"))
    proc = subprocess.run(
        [str(helm), "template", "ragbus", str(CHART), "--set", "tenants={Acme_1}"],
        capture_output=True,
        text=True,
        env={**os.environ, "HELM_CACHE_HOME": str(rendered / ".helm" / "cache")},
    )
    assert proc.returncode != 0
    assert 'tenant "Acme_1": use lower-case letters' in proc.stderr


def test_the_schema_check_rejects_fields_the_apis_do_not_have(rendered: Path, tmp_path: Path) -> None:
    """The check is strict: Strimzi's removed v1beta2 spelling `operation` and a misspelt container
    field both fail, as would any template typo the API server would otherwise drop silently."""
    kubeconform = next(TOOLS.glob("kubeconform-*/kubeconform"))
    objs = _objects(rendered, "tenants")
    user = next(u for u in _of_kind(objs, "KafkaUser") if u["metadata"]["name"] == tenant_principal("acme"))
    rule = user["spec"]["authorization"]["acls"][0]
    rule["operation"] = rule.pop("operations")[0]
    deployment = _one(objs, "Deployment", "gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    for name, obj in (("user", user), ("deployment", deployment)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(obj))
        proc = subprocess.run(
            [
                str(kubeconform),
                "-strict",
                "-schema-location",
                str(HELM_DIR / "schemas" / "json" / "{{ .ResourceKind }}{{ .KindSuffix }}.json"),
                str(tmp_path / f"{name}.yaml"),
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode != 0, f"{name}: {proc.stdout}"
        assert (
            "additional properties" in proc.stdout.lower() or "additionalproperties" in proc.stdout.lower()
        ), proc.stdout


def test_transactional_components_have_stable_instance_ids(rendered: Path) -> None:
    """Workers, processors and the audit sink are StatefulSets whose pod name is RAGBUS_INSTANCE_ID:
    a replacement pod keeps its predecessor's name and so its transactional id (or static group
    membership), and fences the crashed one's open transaction at once."""
    objs = _objects(rendered, "tenants")
    for name in ("worker", "processors", "audit"):
        sts = _one(objs, "StatefulSet", name)
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert _env(sts)["RAGBUS_INSTANCE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert {d["metadata"]["name"] for d in _of_kind(objs, "Deployment")} == {"ragbus-gateway"}
