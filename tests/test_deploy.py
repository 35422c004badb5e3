"""deploy/: Prometheus config and rules (promtool), metric-name drift against the node's
registry, Grafana provisioning, compose file, Kubernetes manifests, the shipped node configs,
Dockerfiles, and the shipped Orthanc auto-forward script against a real Orthanc and node."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml
from prometheus_client import CollectorRegistry
from pynetdicom import AE

from node.metrics import Metrics, metric_names
from node.settings import Settings, load_settings
from storage import repo
from tests.conftest import free_port
from tests.dicomgen import CR_STORAGE, DX_PRESENTATION, SC_STORAGE, make_dataset, write
from tests.nodeproc import InProcessNode, start_in_process

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fracnode.json"
PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
     "offset", "inf", "nan"}
)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus; `make test` installs it)")
    return found


def run(*command: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# -- Prometheus ------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = run(promtool(), "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_rules() -> None:
    result = run(promtool(), "check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests() -> None:
    """The alerts fire on the situations they are named after (and stay quiet before)."""
    result = run(promtool(), "test", "rules", "alerts.test.yml", "alerts-drift.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_the_issue() -> None:
    rules = [rule for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
             for rule in group["rules"]]
    alerts = {rule["alert"] for rule in rules if "alert" in rule}
    assert {
        "FracnodeDown", "FracnodeExportFailures", "FracnodeDeadLetters", "FracnodeBacklogGrowing",
        "FracnodeStudyLatencyHigh", "FracnodeGroupPositiveRateDrift", "FracnodeSpoolDiskLow",
    } <= alerts
    for rule in rules:
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def promql_metrics(expr: str) -> set[str]:
    """Metric (and recorded series) names an expression reads: identifiers that are not
    functions, keywords, label names, strings, durations or Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])", text):
        if text[match.end():].lstrip().startswith("(") or match.group(1) in PROMQL_KEYWORDS:
            continue
        names.add(match.group(1))
    return names


def test_promql_metrics_extractor() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, stage)"
        ' (rate(fracnode_x_bucket{stage=~"a|b"}[$__rate_interval])))'
        ' / on (stage) group_left fracnode:y:ratio1d offset 1d and up{job="fracnode"} > 1e3'
    )
    assert promql_metrics(expr) == {"fracnode_x_bucket", "fracnode:y:ratio1d", "up"}
    assert promql_metrics("time() - fracnode_last_refresh_timestamp_seconds > 120") == {
        "fracnode_last_refresh_timestamp_seconds"
    }


def rule_expressions() -> tuple[list[str], set[str]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return [rule["expr"] for rule in rules], {rule["record"] for rule in rules if "record" in rule}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
        assert match, query
        found.append(match.group(1))
    return found


def test_every_metric_in_rules_and_dashboard_exists_in_the_node() -> None:
    exposed = metric_names(Metrics(CollectorRegistry()))
    expressions, recorded = rule_expressions()
    known = exposed | recorded | {"up"}
    used_in_rules = set().union(*(promql_metrics(e) for e in expressions))
    used_in_dashboard = set().union(*(promql_metrics(e) for e in dashboard_expressions()))
    assert used_in_rules - known == set(), "alert rules use metrics the node does not expose"
    assert used_in_dashboard - known == set(), "the dashboard uses metrics the node does not expose"
    # Not vacuous: the rules and the dashboard read a good part of the node's metrics.
    assert len(used_in_rules & exposed) >= 8
    assert len(used_in_dashboard & exposed) >= 25
    # A renamed metric is caught: drop one from the known set and the check fails.
    assert "fracnode_exports_total" in used_in_rules
    assert used_in_rules - (known - {"fracnode_exports_total"}) == {"fracnode_exports_total"}


def test_prometheus_rule_for_the_operator_equals_alerts_yml() -> None:
    (rule,) = yaml_documents(K8S / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]


# -- Grafana ---------------------------------------------------------------------------------


def test_grafana_provisioning_and_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "fracnode.yml").read_text())["providers"]
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "fracnode"
    uids = {
        panel["datasource"]["uid"] for panel in dashboard["panels"] if panel["type"] != "row"
    } | {target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel.get("targets", [])}
    assert uids == {source["uid"]}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# -- docker compose --------------------------------------------------------------------------


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"orthanc", "fracnode", "prometheus", "grafana", "postgres"} <= set(services)
    assert services["postgres"]["profiles"] == ["postgres"]
    assert all("profiles" not in services[name] for name in ("orthanc", "fracnode", "prometheus", "grafana"))
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
        for port in service.get("ports", []):
            published = str(port)
            # Only DICOM is published beyond this host; every web UI stays on 127.0.0.1.
            assert published.startswith("127.0.0.1:") or published == "4242:4242", (name, published)
    build = services["fracnode"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    gpu = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())["services"]["fracnode"]
    assert (DEPLOY / build["context"] / gpu["build"]["dockerfile"]).is_file()
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    node_job = next(job for job in scrape if job["job_name"] == "fracnode")
    node_settings = load_settings(DEPLOY / "compose" / "fracnode.toml", environ={})
    assert node_job["static_configs"][0]["targets"] == [f"fracnode:{node_settings.api.port}"]


def test_compose_node_and_orthanc_agree() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    node = load_settings(DEPLOY / "compose" / "fracnode.toml", environ={})
    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    peer = orthanc["DicomModalities"]["fracnode"]
    assert (peer["AET"], peer["Host"], peer["Port"]) == (node.dicom.ae_title, "fracnode", node.dicom.port)
    assert node.dicom.allowed_calling_aets == [orthanc["DicomAet"]]
    subnet = compose["networks"]["dicom"]["ipam"]["config"][0]["subnet"]
    assert node.dicom.allowed_hosts == [subnet]
    (destination,) = node.export.destinations
    assert (destination.ae_title, destination.host, destination.port) == (
        orthanc["DicomAet"], "orthanc", orthanc["DicomPort"],
    )
    lua_mounts = [v for v in compose["services"]["orthanc"]["volumes"] if v.endswith(".lua:ro")]
    assert [v.split(":")[1] for v in lua_mounts] == orthanc["LuaScripts"]


# -- node configuration files ----------------------------------------------------------------


def configmap_toml(tmp_path: Path) -> Path:
    (configmap,) = yaml_documents(K8S / "configmap.yaml")
    path = tmp_path / "fracnode.toml"
    path.write_text(configmap["data"]["fracnode.toml"])
    return path


def test_shipped_node_configurations_are_valid(tmp_path: Path) -> None:
    image = load_settings(DEPLOY / "fracnode.toml", environ={})
    compose = load_settings(DEPLOY / "compose" / "fracnode.toml", environ={})
    k8s = load_settings(configmap_toml(tmp_path), environ={})
    for settings in (image, compose, k8s):
        assert isinstance(settings, Settings)
        assert settings.api.host == "0.0.0.0" and settings.api.port == 8080
        assert settings.dicom.host == "0.0.0.0" and settings.dicom.port == 11112
        assert settings.spool.directory == Path("/var/lib/fracnode/spool")
        assert settings.database.url == "sqlite:////var/lib/fracnode/fracnode.db"
    # The image lets nobody in until the site configures its PACS.
    assert image.dicom.allowed_hosts == ["127.0.0.1", "::1"]
    assert k8s.models.device == "cuda"


# -- Kubernetes ------------------------------------------------------------------------------


def k8s_resources() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in yaml_documents(K8S / name):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_manifests_parse_and_fit_together() -> None:
    resources = k8s_resources()
    kinds = {kind for kind, _ in resources}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "Secret", "ServiceMonitor",
            "PrometheusRule", "Namespace"} == kinds
    assert {path.name for path in K8S.glob("*.yaml")} == set(
        yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    ) | {"kustomization.yaml"}

    deployment = resources[("Deployment", "fracnode")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] in {
        name for kind, name in resources if kind == "PersistentVolumeClaim"
    }
    assert ("ConfigMap", volumes["config"]["configMap"]["name"]) in resources
    env = {item["name"]: item for item in container["env"]}
    secret_ref = env["FRACNODE_API__TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = resources[("Secret", secret_ref["name"])]
    assert secret_ref["key"] in secret["stringData"]
    config_path = env["FRACNODE_CONFIG"]["value"]
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts["config"]["mountPath"] == config_path

    service = resources[("Service", "fracnode")]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(ports)
    monitor = resources[("ServiceMonitor", "fracnode")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    dicom_service = resources[("Service", "fracnode-dicom")]
    selected = monitor["spec"]["selector"]["matchLabels"].items()
    assert not selected <= dicom_service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    assert (credentials["name"], credentials["key"]) == (secret_ref["name"], secret_ref["key"])


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = run(kubectl, "kustomize", str(K8S), cwd=K8S)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(docs) == len(k8s_resources())
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    assert deployment["metadata"]["namespace"] == "fracnode"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith("fracnode:0.1.0")


# -- Dockerfiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile(name: str) -> None:
    text = (DEPLOY / name).read_text()
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()]
    instructions = [line for line in lines if not line.startswith("#")]
    froms = [line.split()[1] for line in instructions if line.startswith("FROM")]
    if name == "Dockerfile":
        assert "nvidia/cuda:" in text and "runtime" in text.split("CUDA_IMAGE=")[1].split()[0]
    else:
        assert froms[0].startswith("python:3.11")
    (user,) = [line for line in instructions if line.startswith("USER")]
    assert not user.split()[1].startswith(("0", "root"))
    (health,) = [line for line in instructions if line.startswith("HEALTHCHECK")]
    assert "/healthz" in health
    ignored = (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
    repo_root = DEPLOY.parent
    for line in instructions:
        if line.startswith("COPY") and "--from" not in line:
            *sources, _target = line.split()[1:]
            for source in sources:
                assert (repo_root / source).exists() or source == "README.md", source
                assert f"!{source.rstrip('/')}" in [i.rstrip("/") for i in ignored], f"{source} is ignored"


# -- Orthanc auto-forward (the shipped Lua script, a real Orthanc, a real node) -----------------


@pytest.fixture
def node_and_orthanc(tmp_path: Path) -> Iterator[tuple[InProcessNode, int, int]]:
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
    if binary is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc; `make test` installs it)")
    node = start_in_process(tmp_path / "node")
    config = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    http_port, dicom_port = free_port(), free_port()
    config.update(
        StorageDirectory=str(tmp_path / "orthanc"),
        IndexDirectory=str(tmp_path / "orthanc"),
        HttpPort=http_port,
        DicomPort=dicom_port,
        RemoteAccessAllowed=False,
        AuthenticationEnabled=False,
        LuaScripts=[str(DEPLOY / "orthanc" / "autoforward.lua")],
        DicomAssociationCloseDelay=0,
        Plugins=[],
    )
    config["DicomModalities"]["fracnode"].update(Host="127.0.0.1", Port=node.port)
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("wb")
    process = subprocess.Popen([binary, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not orthanc_answers(http_port):
            alive = process.poll() is None and time.monotonic() < deadline
            assert alive, (tmp_path / "orthanc.log").read_text()
            time.sleep(0.1)
        yield node, http_port, dicom_port
    finally:
        process.terminate()
        process.wait(15)
        log.close()
        node.server.stop()
        node.db.dispose()


def orthanc_answers(http_port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{http_port}/system", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def study_count(node: InProcessNode, study_uid: str) -> int:
    return len(repo.study_instances(node.db, study_uid))


def test_orthanc_forwards_cr_and_dx_but_not_results_or_the_nodes_own(
    node_and_orthanc: tuple[InProcessNode, int, int], tmp_path: Path
) -> None:
    node, http_port, dicom_port = node_and_orthanc
    files = {
        name: write(make_dataset(sop_class=sop_class), tmp_path / f"{name}.dcm")
        for name, sop_class in (("cr", CR_STORAGE), ("dx", DX_PRESENTATION), ("sc", SC_STORAGE),
                                ("from_node", CR_STORAGE), ("after", DX_PRESENTATION))
    }
    studies = {name: str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
               for name, path in files.items()}
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as client:
        for name in ("cr", "sc", "dx"):
            client.post("/instances", content=files[name].read_bytes()).raise_for_status()
    # The node's own AE title sends a CR (as a result would come back), then a modality sends a DX.
    for calling, name in (("FRACNODE", "from_node"), ("MODALITY", "after")):
        ae = AE(ae_title=calling)
        ae.add_requested_context(CR_STORAGE if name == "from_node" else DX_PRESENTATION)
        assoc = ae.associate("127.0.0.1", dicom_port, ae_title="ORTHANC")
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(files[name]).Status) == 0
        finally:
            assoc.release()
    deadline = time.monotonic() + 30
    while study_count(node, studies["after"]) == 0:
        assert time.monotonic() < deadline, "Orthanc did not forward the DX sent by the modality"
        time.sleep(0.2)
    # Lua handles stored instances in order: everything stored before "after" has been decided.
    assert study_count(node, studies["cr"]) == 1
    assert study_count(node, studies["dx"]) == 1
    assert study_count(node, studies["sc"]) == 0
    assert study_count(node, studies["from_node"]) == 0
