"""The Helm chart, rendered by Helm's own engine (helm-python-sdk) and checked against the Kubernetes
schemas (kubernetes-validate): GPU and CPU values, autoscaling and monitoring on and off, model
sources, probes, security, and values the schema refuses. The alert rules' and the dashboard's
PromQL is parsed (promql-parser) and checked against the series a real server exposes. No cluster
needed."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import promql_parser
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "k8s" / "uembed"
KUBE_VERSIONS = ("1.30.0", "1.37.0")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # not in the core schemas: checked field by field below


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


def render(chart: helm_python.Chart, values: dict[str, Any] | None = None) -> dict[str, dict]:
    """Rendered objects by kind (tests/ hooks under 'TestPod'); every object validated strictly."""
    out: dict[str, dict] = {}
    for path, text in chart.render(copy.deepcopy(values or {}), name="emb", namespace="ml").items():
        if path.endswith("NOTES.txt"):
            continue
        for obj in yaml.safe_load_all(text):
            if not obj:
                continue
            if obj["kind"] not in CRD_KINDS:
                for version in KUBE_VERSIONS:
                    kubernetes_validate.validate(obj, version, strict=True)
            key = ("TestPod" if "/tests/" in path else "DashboardConfigMap" if path.endswith("grafana-dashboard.yaml")
                   else obj["kind"])
            assert key not in out, f"two {key} objects"
            out[key] = obj
    return out


def pod_spec(objs: dict[str, dict]) -> dict:
    return objs["Deployment"]["spec"]["template"]["spec"]


def server(objs: dict[str, dict]) -> dict:
    (container,) = [c for c in pod_spec(objs)["containers"] if c["name"] == "uembed"]
    return container


GPU = {}
CPU = {"gpu": {"count": 0}, "resources": {"requests": {"cpu": "2", "memory": "2Gi"},
                                          "limits": {"cpu": "4", "memory": "4Gi"}}}


MONITORED = {"monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                            "grafanaDashboard": {"enabled": True}}}


def test_lint_is_clean() -> None:
    for values in (GPU, CPU, MONITORED):
        report = helm_python.lint(str(CHART), copy.deepcopy(values), strict=True, kube_version="v1.30.0")
        assert report["errors"] == [], report
        assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]


def test_gpu_render_has_gpu_limits_toleration_probes_and_security(chart: helm_python.Chart) -> None:
    objs = render(chart, GPU)
    spec, c = pod_spec(objs), server(objs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert c["image"].endswith(":0.1.0-gpu")
    assert objs["ConfigMap"]["data"]["UEMBED_DEVICE"] == "cuda"
    # Probes: a long startup window (model load + TensorRT build), readiness on /readyz, liveness on /healthz.
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["timeoutSeconds"] <= 2
    # Shutdown: preStop lets endpoints drop the pod; the grace period outlasts preStop + drain.
    assert "sleep" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    drain = float(objs["ConfigMap"]["data"]["UEMBED_DRAIN_TIMEOUT_S"])
    assert spec["terminationGracePeriodSeconds"] > drain + 5
    # Security.
    psc, csc = spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert {"/tmp", "/cache", "/dev/shm"} <= set(mounts)
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert objs["ConfigMap"]["data"]["UEMBED_CACHE_DIR"].startswith("/cache")
    # Service account without a token; named ports; GPU-friendly rollout.
    assert spec["automountServiceAccountToken"] is False
    assert objs["ServiceAccount"]["automountServiceAccountToken"] is False
    assert {p["name"] for p in objs["Service"]["spec"]["ports"]} == {"http", "metrics"}
    assert objs["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert objs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("values", [GPU, CPU], ids=["gpu", "cpu"])
def test_the_configmap_is_a_valid_server_configuration(chart: helm_python.Chart, values: dict,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each UEMBED_* variable the chart sets names a real setting (a typo would be ignored by the
    server, silently), and the server's own settings class accepts the whole environment."""
    from service.config import Settings

    data = render(chart, values)["ConfigMap"]["data"]
    unknown = {k for k in data if k.removeprefix("UEMBED_").lower() not in Settings.model_fields}
    assert not unknown, unknown
    for key in [k for k in os.environ if k.startswith("UEMBED_")]:
        monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.body_timeout_s == 30 and settings.request_timeout_ms == 10_000
    assert settings.max_batch_size == 16 and settings.device == ("cuda" if values is GPU else "cpu")


def test_gpu_product_affinity_and_runtime_class(chart: helm_python.Chart) -> None:
    objs = render(chart, {"gpu": {"count": 2, "products": ["NVIDIA-H100-80GB-HBM3"], "runtimeClassName": "nvidia"}})
    spec = pod_spec(objs)
    assert spec["runtimeClassName"] == "nvidia"
    assert server(objs)["resources"]["limits"]["nvidia.com/gpu"] == 2
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "nvidia.com/gpu.product", "operator": "In",
                                         "values": ["NVIDIA-H100-80GB-HBM3"]}]


def test_cpu_render_has_none_of_the_gpu_settings(chart: helm_python.Chart) -> None:
    gpu_only = {"count": 0, "products": ["NVIDIA-H100-80GB-HBM3"], "runtimeClassName": "nvidia"}
    values = copy.deepcopy(CPU) | {"gpu": gpu_only}
    objs = render(chart, values)
    spec, c = pod_spec(objs), server(objs)
    assert "nvidia" not in yaml.safe_dump(objs).lower()
    assert "tolerations" not in spec and "affinity" not in spec and "runtimeClassName" not in spec
    assert c["image"].endswith(":0.1.0-cpu")
    assert objs["ConfigMap"]["data"]["UEMBED_DEVICE"] == "cpu"
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "4Gi"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("values", [GPU, CPU], ids=["gpu", "cpu"])
def test_autoscaling_on_and_off(chart: helm_python.Chart, values: dict) -> None:
    off = render(chart, values)
    assert "HorizontalPodAutoscaler" not in off and off["Deployment"]["spec"]["replicas"] == 1
    on = render(chart, copy.deepcopy(values) | {"autoscaling": {"enabled": True, "maxReplicas": 6}})
    assert "replicas" not in on["Deployment"]["spec"]
    hpa = on["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == on["Deployment"]["metadata"]["name"] and hpa["maxReplicas"] == 6
    kinds = {m["type"]: m for m in hpa["metrics"]}
    assert kinds["Pods"]["pods"]["metric"]["name"] == "uembed_queue_depth_images"
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    cpu_only = render(chart, copy.deepcopy(values) | {"autoscaling": {"enabled": True,
                                                                       "queueMetric": {"enabled": False}}})
    assert [m["type"] for m in cpu_only["HorizontalPodAutoscaler"]["spec"]["metrics"]] == ["Resource"]


def test_monitoring_on_and_off(chart: helm_python.Chart) -> None:
    off = render(chart, {"monitoring": {"podAnnotations": False}})
    assert "ServiceMonitor" not in off
    assert "prometheus.io/scrape" not in off["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    on = render(chart, {"monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    sm = on["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= on["Service"]["spec"]["selector"].items()
    assert on["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


# Labels Prometheus adds to every scraped series (target labels), not the service's own.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "container", "endpoint"}
ALERTS = {"UembedTargetDown", "UembedNotReady", "UembedServerErrors", "UembedInternalError", "UembedOverloaded",
          "UembedHighLatency"}


@pytest.fixture(scope="module")
def exposed() -> dict[str, dict[str, set[str]]]:
    """Series name -> label -> values, scraped from /metrics of the real service (the shipped
    model, in process) after a good and a bad request; `up` is Prometheus's own. The status label of
    uembed_requests_total may also take every status /embed documents, seen here or not."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from service.api import ERROR_CODES
    from service.app import create_app
    from service.config import Settings

    root = CHART.parents[1]
    photo = (root / "loadtest" / "photos" / "brick_160x160.jpg").read_bytes()
    with TestClient(create_app(Settings(model=str(root / "models" / "default")))) as client:
        assert client.post("/embed", content=photo, headers={"content-type": "image/jpeg"}).status_code == 200
        assert client.post("/embed", content=b"junk", headers={"content-type": "image/jpeg"}).status_code == 400
        text = client.get("/metrics").text
    series: dict[str, dict[str, set[str]]] = {"up": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = series.setdefault(sample.name, {})
            for k, v in sample.labels.items():
                labels.setdefault(k, set()).add(v)
    seen = series["uembed_requests_total"]["status"]
    assert seen == {"200", "400"}, seen
    seen |= {"200", "499"} | {str(status) for status in ERROR_CODES}
    return series


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []
    promql_parser.walk(promql_parser.parse(expr),  # raises ValueError on a syntax error
                       lambda node: found.append(node) if isinstance(node, promql_parser.VectorSelector) else None)
    assert found, expr
    return found


def check_series(expr: str, exposed: dict[str, dict[str, set[str]]], scope: dict[str, str]) -> None:
    """Every series `expr` selects is one the service exposes, through labels it has, with values
    it emits, and within `scope` (this release's target labels)."""
    for sel in selectors(expr):
        assert sel.name in exposed, f"{sel.name} is not a series the service exposes ({expr})"
        matchers = {m.name: (str(m.op), m.value) for m in sel.matchers.matchers}
        for label, value in scope.items():
            assert matchers.get(label) == ("MatchOp.Equal", value), (label, expr)
        for label, (op, value) in matchers.items():
            if label in TARGET_LABELS:
                continue
            assert label in exposed[sel.name], f"{sel.name} has no label {label!r} ({expr})"
            values = value.split("|") if op == "MatchOp.Re" else [value]
            unknown = set(values) - exposed[sel.name][label]
            assert not unknown, f"{sel.name}{{{label}}} never takes {unknown} ({expr})"


def test_alert_rules(chart: helm_python.Chart, exposed: dict[str, dict[str, set[str]]]) -> None:
    assert "PrometheusRule" not in render(chart)
    values = {"monitoring": {"prometheusRule": {
        "enabled": True, "labels": {"release": "prom"}, "extraLabels": {"team": "search"},
        "runbookUrl": "https://runbooks.example/uembed", "latencyP99Seconds": 0.25, "serverErrorRatio": 0.02}}}
    rule = render(chart, values)["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "prom"
    (group,) = rule["spec"]["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    assert set(rules) == ALERTS and len(group["rules"]) == len(ALERTS)
    for name, r in rules.items():
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert r["labels"] == {"severity": r["labels"]["severity"], "team": "search"}
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        assert r["annotations"]["runbook_url"] == "https://runbooks.example/uembed"
        top = promql_parser.parse(r["expr"])
        assert isinstance(top, promql_parser.BinaryExpr) and str(top.op) in (">", "=="), f"{name}: not a condition"
        check_series(r["expr"], exposed, {"job": "emb-uembed", "namespace": "ml"})
    assert rules["UembedHighLatency"]["expr"].endswith("> 0.25")
    assert rules["UembedServerErrors"]["expr"].endswith("> 0.02")
    assert rules["UembedNotReady"]["for"] == "10m" and "for" not in rules["UembedInternalError"]
    # Prometheus's own templates reach the rule untouched by Helm's.
    assert "{{ $labels.pod }}" in rules["UembedTargetDown"]["annotations"]["summary"]
    assert "{{ $value | humanizePercentage }}" in rules["UembedOverloaded"]["annotations"]["summary"]

    # Another scrape config: the selector replaces job and namespace everywhere.
    custom = render(chart, {"monitoring": {"prometheusRule": {"enabled": True, "selector": 'service="embed"'}}})
    for r in custom["PrometheusRule"]["spec"]["groups"][0]["rules"]:
        check_series(r["expr"], exposed, {"service": "embed"})
        assert "job=" not in r["expr"] and "runbook_url" not in r["annotations"]


def test_alert_rules_check_the_series(exposed: dict[str, dict[str, set[str]]]) -> None:
    """The check above fails on the mistakes it exists for."""
    scope = {"job": "j"}
    check_series('rate(uembed_requests_total{job="j",status=~"429|504"}[5m]) > 0', exposed, scope)
    for wrong in ('rate(uembed_request_total{job="j"}[5m]) > 0',  # a renamed metric
                  'rate(uembed_requests_total{job="j",code="500"}[5m]) > 0',  # a label it does not have
                  'rate(uembed_requests_total{job="j",status="5xx"}[5m]) > 0',  # a value it never takes
                  'rate(uembed_failures_total{job="j",reason=~"internal|oom"}[5m]) > 0',
                  'rate(uembed_requests_total{namespace="j"}[5m]) > 0'):  # outside the release
        with pytest.raises(AssertionError):
            check_series(wrong, exposed, scope)
    with pytest.raises(ValueError):
        selectors('sum(rate(uembed_images_total{job="j"}[5m]) > 0')


def promtool_test(chart: helm_python.Chart, rule_values: dict, where: Path) -> subprocess.CompletedProcess:
    """`promtool check rules` on the rendered rules (must pass), then `promtool test rules` of
    alerts_test.yaml against them (returned)."""
    values = {"monitoring": {"prometheusRule": {"enabled": True, **rule_values}}}
    groups = render(chart, values)["PrometheusRule"]["spec"]["groups"]
    (where / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False, width=1000))
    shutil.copy(Path(__file__).with_name("alerts_test.yaml"), where)
    check = subprocess.run(["promtool", "check", "rules", "rules.yaml"], cwd=where, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    return subprocess.run(["promtool", "test", "rules", "alerts_test.yaml"], cwd=where, capture_output=True,
                          text=True)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_alerts_fire_as_designed(chart: helm_python.Chart, tmp_path: Path) -> None:
    """Prometheus's own rule engine on synthetic series (tests/deploy/alerts_test.yaml): each alert
    fires on what it is for, only after its `for`, with its labels and annotations, and not on
    near misses (another release, no traffic, 4xx, failed requests' latency)."""
    tests = yaml.safe_load(Path(__file__).with_name("alerts_test.yaml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == ALERTS, ALERTS - fired
    passed = promtool_test(chart, {}, tmp_path)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    # The same data against a 5% threshold for 500s: the 2% case must no longer fire.
    (tmp_path / "strict").mkdir()
    failed = promtool_test(chart, {"serverErrorRatio": 0.05}, tmp_path / "strict")
    report = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "alertname: UembedServerErrors" in report, report
    assert report.count("alertname:") == 1, report  # only that case


def test_grafana_dashboard(chart: helm_python.Chart, exposed: dict[str, dict[str, set[str]]]) -> None:
    assert "DashboardConfigMap" not in render(chart)
    cm = render(chart, {"monitoring": {"grafanaDashboard": {"enabled": True}}})["DashboardConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["uembed.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "uembed.json").read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace", "job"}
    # Grafana substitutes $__rate_interval before Prometheus sees a query.
    exprs = [t["expr"].replace("$__rate_interval", "1m") for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10 and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for expr in exprs:
        check_series(expr, exposed, {"namespace": "$namespace", "job": "$job"})

    def family(series: str) -> str:
        for suffix in ("_total", "_bucket", "_sum", "_count"):
            series = series.removesuffix(suffix)
        return series

    shown = {family(sel.name) for e in exprs for sel in selectors(e)}
    families = {family(n) for n in exposed if n.startswith("uembed_") and not n.endswith("_created")}
    assert families <= shown, f"metrics without a panel: {families - shown}"


def test_config_checksum_follows_server_settings(chart: helm_python.Chart) -> None:
    def checksum(values: dict) -> str:
        return render(chart, values)["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum({})
    assert base == checksum({})
    assert base != checksum({"server": {"maxBatchSize": 32}})
    objs = render(chart, {"server": {"maxBatchSize": 32, "extraEnv": {"UEMBED_MAX_IMAGE_PIXELS": 1000000}}})
    assert objs["ConfigMap"]["data"]["UEMBED_MAX_BATCH_SIZE"] == "32"
    assert objs["ConfigMap"]["data"]["UEMBED_MAX_IMAGE_PIXELS"] == "1000000"


@pytest.mark.parametrize("source", ["initContainer", "pvc"])
def test_model_from_init_container_or_pvc(chart: helm_python.Chart, source: str) -> None:
    values = {"model": {"source": source, "pvc": {"claimName": "models"},
                        "initContainer": {"image": "busybox:1.36", "command": ["sh", "-c", "cp -r /src/. $MODEL_DIR"]}}}
    objs = render(chart, values)
    spec = pod_spec(objs)
    assert objs["ConfigMap"]["data"]["UEMBED_MODEL"] == "/models/current"
    mount = next(m for m in server(objs)["volumeMounts"] if m["mountPath"] == "/models/current")
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    if source == "pvc":
        assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
        assert "initContainers" not in spec
    else:
        (init,) = spec["initContainers"]
        assert "emptyDir" in volume and init["image"] == "busybox:1.36" and init["resources"]["limits"]
        assert init["securityContext"]["readOnlyRootFilesystem"] is True


def test_every_container_has_resources_and_the_test_pod_posts_an_image(chart: helm_python.Chart) -> None:
    objs = render(chart, {"model": {"source": "initContainer", "initContainer": {"command": ["true"]}}})
    pods = [pod_spec(objs), objs["TestPod"]["spec"]]
    containers = [c for p in pods for c in [*p.get("initContainers", []), *p["containers"]]]
    assert len(containers) == 3
    for c in containers:
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
    test_pod = objs["TestPod"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = test_pod["spec"]["containers"][0]["command"][-1]
    env = {e["name"]: e["value"] for e in test_pod["spec"]["containers"][0]["env"]}
    assert "/embed" in env["UEMBED_URL"] and objs["Service"]["metadata"]["name"] in env["UEMBED_URL"]
    compile(script, "test-embed", "exec")  # the embedded Python is at least valid Python
    assert "urlopen" in script and "binary" in script


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gpu": {"count": -1}}, "/gpu/count"),
        ({"server": {"backend": "tensorflow"}}, "/server/backend"),
        ({"server": {"maxBatchSize": 0}}, "/server/maxBatchSize"),
        ({"server": {"extraEnv": {"PATH": "/evil"}}}, "PATH. does not match"),
        ({"model": {"source": "s3"}}, "/model/source"),
        ({"replicas": 3}, "additional properties 'replicas'"),
        ({"probes": {"startup": {"periodSeconds": "often"}}}, "/probes/startup/periodSeconds"),
        ({"monitoring": {"prometheusRule": {"serverErrorRatio": 1.5}}}, "/monitoring/prometheusRule/serverErrorRatio"),
        ({"monitoring": {"prometheusRule": {"notReadyFor": "ten minutes"}}}, "/monitoring/prometheusRule/notReadyFor"),
    ],
)
def test_values_that_break_the_schema_are_refused(chart: helm_python.Chart, values: dict, message: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=message):
        chart.render(values, name="emb", namespace="ml")


def test_pvc_without_a_claim_is_a_clear_error(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmError, match="claimName is required"):
        chart.render({"model": {"source": "pvc"}}, name="emb", namespace="ml")
