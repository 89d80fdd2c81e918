"""The deployment kit (``deploy/``), checked offline by the tools that own each format.

- Prometheus: ``promtool check config``, ``check rules`` and ``test rules`` (unit tests of every
  alert firing and not firing), and every dashboard query parsed by promtool as PromQL.
- Metric names: every series the dashboard, the alerts and the alert tests name, and the
  labels they select on, exist in ``gateway/metrics.py`` (read from ``Metrics().registry``).
- Compose: the Compose Specification schema (vendored in check-jsonschema).
- Kubernetes: the API schemas bundled with kubernetes-validate, strict (no unknown fields).
- Dockerfile: its shape (stages, user, health check, no baked-in secrets), and its health
  check run against a real ``avatar-gateway serve``.
- Every ``AVATAR_GATEWAY_*`` name the kit mentions is a real setting, and the environments
  it sets up (image, compose, Deployment) are valid configurations.

None of these tools touches the network (their schemas ship with them). Building the image
needs a Docker engine and is not done here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
from aiortc.rtcicetransport import connection_kwargs
from prometheus_client.metrics import MetricWrapperBase
from ruamel.yaml import YAML

import gateway
from gateway.app import WEB_ROOT
from gateway.config import ENV_PREFIX, Settings
from gateway.metrics import Metrics
from gateway.upstream.rest import RetryPolicy
from gateway.viewers.peer import rtc_configuration

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_REPLICAS = DEPLOY / "compose.replicas.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_REPLICAS = DEPLOY / "prometheus" / "prometheus.replicas.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "avatar-gateway.json"
K8S = [DEPLOY / "k8s" / name
       for name in ("deployment.yaml", "service.yaml", "secret.example.yaml", "replicas.yaml")]
VENV_BIN = Path(sys.executable).parent
PROMTOOL = Path("/usr/bin/promtool")
TIMEOUT = 60.0


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def assert_ok(result: subprocess.CompletedProcess[str], context: str = "") -> None:
    assert result.returncode == 0, (f"{shlex.join(result.args)} exited {result.returncode}\n"
                                    f"{result.stdout}\n{result.stderr}\n{context}".rstrip())


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in YAML(typ="safe", pure=True).load_all(path.read_text(encoding="utf-8"))
            if doc is not None]


@pytest.fixture(scope="module")
def promtool() -> Path:
    if PROMTOOL.exists():
        return PROMTOOL
    if os.environ.get("CI") == "true":
        pytest.fail("promtool is missing; `make test` installs Debian's prometheus package")
    pytest.skip("promtool is missing (Debian package prometheus)")


# -- Prometheus: config, rules, rule unit tests ------------------------------------------------


def test_prometheus_config_is_valid(promtool: Path) -> None:
    assert_ok(run(promtool, "check", "config", PROMETHEUS_CONFIG))
    assert_ok(run(promtool, "check", "config", PROMETHEUS_REPLICAS))


def test_alert_rules_are_valid(promtool: Path) -> None:
    assert_ok(run(promtool, "check", "rules", ALERTS))


def test_alert_rules_pass_their_unit_tests(promtool: Path) -> None:
    result = run(promtool, "test", "rules", ALERTS_TEST)
    assert_ok(result)
    assert "SUCCESS" in result.stdout + result.stderr


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_every_alert_has_for_severity_annotations_and_a_unit_test() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert set(names) >= {"GatewayDown", "NotReady", "StreamFrozen",
                          "UpstreamSessionsWithoutViewers", "SessionStartFailures",
                          "ViewerIceFailures", "HighEventLoopLag"}
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert firing == set(names), "every alert needs a case where it fires"
    assert silent == set(names), "every alert needs a case where it stays silent"


# -- metric names ------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<var>\$\{[^}]*\}|\$\w+)
  | (?P<punct>[(){},])
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=@])
  | (?P<space>\s+)
""", re.VERBOSE)

_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                 "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
_LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _AGGREGATIONS | _LABEL_LIST_KEYWORDS | {"and", "or", "unless", "bool", "offset",
                                                   "atan2", "inf", "nan"}
NOT_OURS = {"up"}
"""Series Prometheus makes itself, not the gateway."""


@dataclass(frozen=True)
class Selector:
    metric: str
    labels: frozenset[str]


@dataclass(frozen=True)
class Query:
    selectors: list[Selector]
    grouping: frozenset[str]
    """Labels named by ``by``, ``without``, ``on``, ``ignoring``, ``group_left/right``."""


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read {expr[position:position + 20]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, match.group()))
        position = match.end()
    return out


def parse_promql(expr: str) -> Query:
    """The series selectors of a PromQL expression (metric names and the labels they
    match) and the labels it groups or matches by.

    Functions (an identifier before ``(``), aggregations, keywords, strings, ranges and
    numbers are not metric names.
    """
    tokens = _tokens(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text.lower() in _LABEL_LIST_KEYWORDS and following == "(":
            end = tokens.index(("punct", ")"), i)
            grouping |= {t for k, t in tokens[i + 2:end] if k == "ident"}
            i = end + 1
            continue
        if kind != "ident" or text.lower() in _KEYWORDS or following == "(":
            i += 1
            continue
        labels: set[str] = set()
        i += 1
        if following == "{":
            end = tokens.index(("punct", "}"), i)
            labels = {t for k, t in tokens[i + 1:end] if k == "ident"}
            i = end + 1
        selectors.append(Selector(text, frozenset(labels)))
    return Query(selectors, frozenset(grouping))


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the gateway exports, with the label names it can carry.

    Built from ``Metrics().registry.collect()``: a family's samples, plus the names its type
    implies (a labelled family has no samples until a label set is used).
    """
    metrics = Metrics()
    declared = {wrapper._name: frozenset(wrapper._labelnames) for wrapper in vars(metrics).values()
                if isinstance(wrapper, MetricWrapperBase)}
    assert "avatargw_sessions" in declared
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created"), "info": ("_info",),
                "gaugehistogram": ("_bucket", "_gcount", "_gsum")}
    series: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        labels = declared.get(family.name, frozenset()).union(
            *(sample.labels for sample in family.samples))
        for suffix in suffixes.get(family.type, ("",)):
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        for sample in family.samples:
            series[sample.name] = series.get(sample.name, frozenset()) | frozenset(sample.labels)
    return series


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def dashboard_queries(board: Mapping[str, Any]) -> dict[str, str]:
    """Every PromQL expression of the dashboard: panel targets and annotations."""
    queries: dict[str, str] = {}
    for panel in _panels(board["panels"]):
        for target in panel.get("targets", []):
            queries[f"panel {panel['id']} {panel['title']!r} {target['refId']}"] = target["expr"]
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            queries[f"annotation {annotation['name']!r}"] = annotation["expr"]
    return queries


def dashboard_variable_queries(board: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """``label_values(<selector>, <label>)`` variables: selector and label."""
    found: dict[str, tuple[str, str]] = {}
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert match, f"variable {variable['name']}: only label_values(...) is checked"
            found[f"variable {variable['name']}"] = (match[1], match[2])
    return found


def referenced_queries() -> dict[str, Query]:
    board = dashboard()
    references = {f"dashboard {where}": parse_promql(expr)
                  for where, expr in dashboard_queries(board).items()}
    for where, (selector, label) in dashboard_variable_queries(board).items():
        references[f"dashboard {where}"] = Query(parse_promql(selector).selectors,
                                                 frozenset({label}))
    for rule in alert_rules():
        references[f"alert {rule['alert']}"] = parse_promql(rule["expr"])
    for number, case in enumerate(load_yaml(ALERTS_TEST)["tests"]):
        for series in case["input_series"]:
            references[f"alerts_test case {number} {series['series']}"] = \
                parse_promql(series["series"])
    return references


def unknown_references(references: Mapping[str, Query],
                       series: Mapping[str, frozenset[str]]) -> list[str]:
    """What the queries name that the gateway does not export: metrics, the labels selected
    on, and the labels grouped by (which must belong to one of the query's metrics)."""
    problems = []
    always = {"job", "instance"}
    for where, query in references.items():
        if not query.selectors:
            problems.append(f"{where}: names no metric")
        available = set(always)
        for selector in query.selectors:
            if selector.metric in NOT_OURS:
                continue
            if selector.metric not in series:
                problems.append(f"{where}: {selector.metric} is not a series the gateway exports")
                continue
            available |= series[selector.metric]
            extra = selector.labels - series[selector.metric] - always
            if extra:
                problems.append(f"{where}: {selector.metric} has no label {sorted(extra)}")
        if query.grouping - available:
            problems.append(f"{where}: no metric here has label {sorted(query.grouping - available)}")
    return problems


def test_every_referenced_metric_and_label_exists() -> None:
    references = referenced_queries()
    assert sum(len(q.selectors) for q in references.values()) > 50
    problems = unknown_references(references, exported_series())
    assert not problems, "\n".join(problems)


def test_the_metric_check_catches_made_up_metrics_and_labels() -> None:
    series = exported_series()
    expr = ('histogram_quantile(0.99, sum by (le, codec) '
            '(rate(avatargw_video_encode_duration_seconds_bucket{job=~"$job"}[$__rate_interval])))'
            ' / on (instance) group_left sum(rate(avatargw_made_up_total[5m]))'
            ' + max without (kind) (avatargw_viewers{colour="blue"})'
            ' and avatargw_event_loop_lag_seconds > 0.1')
    query = parse_promql(expr)
    assert [s.metric for s in query.selectors] == [
        "avatargw_video_encode_duration_seconds_bucket", "avatargw_made_up_total",
        "avatargw_viewers", "avatargw_event_loop_lag_seconds"]
    assert query.grouping == {"le", "codec", "instance", "kind"}
    assert unknown_references({"example": query}, series) == [
        "example: avatargw_made_up_total is not a series the gateway exports",
        "example: avatargw_viewers has no label ['colour']",
        # a histogram is exported as _bucket/_sum/_count only
        "example: avatargw_event_loop_lag_seconds is not a series the gateway exports",
        "example: no metric here has label ['kind']",
    ]


def test_dashboard_queries_parse_as_promql(promtool: Path, tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule for promtool."""
    rules: dict[str, str] = {}
    wheres: list[str] = []
    for number, (where, expr) in enumerate(sorted(dashboard_queries(dashboard()).items())):
        concrete = re.sub(r"\$__\w+", "1m", expr)
        rules[f"dashboard:query_{number}"] = re.sub(r"\$\{?\w+\}?", ".+", concrete)
        wheres.append(f"dashboard:query_{number}: {where}")
    path = tmp_path / "dashboard_rules.json"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": [
        {"record": record, "expr": expr} for record, expr in rules.items()]}]}))
    assert_ok(run(promtool, "check", "rules", path), "\n".join(wheres))


# -- Grafana -----------------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "avatar-gateway" and board["title"]
    panels = list(_panels(board["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    data_panels = [panel for panel in panels if panel["type"] != "row"]
    assert len(data_panels) >= 20
    for panel in panels:
        where = f"panel {panel['id']} {panel.get('title')!r}"
        position = panel["gridPos"]
        assert position["x"] >= 0 and position["x"] + position["w"] <= 24, where
        if panel["type"] == "row":  # a row groups panels; it queries nothing
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["targets"], f"{where} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
    titles = " | ".join(panel["title"] for panel in data_panels).lower()
    for topic in ("viewers by state", "sessions by upstream", "session-minutes", "encoded fps",
                  "keyframes", "packet drops", "encode time", "bitrate", "time to first frame",
                  "rtcp feedback", "state transitions", "event-loop lag", "http requests",
                  "http p99", "llm latency", "round-trip", "packet loss"):
        assert topic in titles, f"no panel about {topic}"


def test_grafana_provisioning_points_at_the_dashboards_and_prometheus() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    provider = load_yaml(provisioning / "dashboards" / "dashboards.yml")["providers"][0]
    services = load_yaml(COMPOSE)["services"]
    mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"])
    assert (DEPLOY / "grafana" / "dashboards").samefile(DASHBOARD.parent)
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    assert mounts["./grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    listen = next(arg for arg in services["prometheus"]["command"]
                  if arg.startswith("--web.listen-address="))
    assert datasources[0]["url"] == "http://" + listen.split("=", 1)[1]


# -- Compose -----------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    for compose in (COMPOSE, COMPOSE_REPLICAS):
        assert_ok(run(VENV_BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec",
                      compose))


def test_compose_replicas_share_redis_and_each_has_its_own_address() -> None:
    services = load_yaml(COMPOSE_REPLICAS)["services"]
    gateways = {name: s for name, s in services.items() if name.startswith("gateway")}
    assert len(gateways) == 2 and "redis" in services
    env = [s["environment"] for s in gateways.values()]
    for key in ("AVATAR_GATEWAY_PORT", "AVATAR_GATEWAY_REPLICA_ID", "AVATAR_GATEWAY_PUBLIC_URL"):
        assert len({e[key] for e in env}) == 2, key  # one each
    assert len({e["AVATAR_GATEWAY_REDIS_URL"] for e in env}) == 1  # one Redis
    assert len({s["volumes"][0].split(":")[0] for s in gateways.values()}) == 2  # own journals
    ports = sorted(e["AVATAR_GATEWAY_PORT"] for e in env)
    job = next(j for j in load_yaml(PROMETHEUS_REPLICAS)["scrape_configs"]
               if j["job_name"] == "avatar-gateway")
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{p}" for p in ports]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_kubernetes_replicas_each_have_a_name_an_address_and_a_journal() -> None:
    resources = k8s_resources()
    stateful = resources["StatefulSet/avatar-gateway-replicas"]
    assert stateful["spec"]["replicas"] >= 2
    pod = stateful["spec"]["template"]["spec"]
    container = _container(stateful)
    names = [e["name"] for e in container["env"]]
    env = {e["name"]: e for e in container["env"]}
    # $(POD_NAME) expands only if POD_NAME comes first.
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for key in ("AVATAR_GATEWAY_REPLICA_ID", "AVATAR_GATEWAY_PUBLIC_URL"):
        assert "$(POD_NAME)" in env[key]["value"] and names.index("POD_NAME") < names.index(key)
    secret = resources["Secret/avatar-gateway"]
    secret_volume = next(v["name"] for v in pod["volumes"] if "secret" in v)
    secret_dir = next(Path(m["mountPath"]) for m in container["volumeMounts"]
                      if m["name"] == secret_volume)
    redis = Path(env["AVATAR_GATEWAY_REDIS_URL_FILE"]["value"])
    assert redis.parent == secret_dir and redis.name in secret["stringData"]
    templates = {t["metadata"]["name"] for t in stateful["spec"]["volumeClaimTemplates"]}
    state = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[
        env["AVATAR_GATEWAY_STATE_DIR"]["value"]]
    assert state in templates
    headless = resources["Service/avatar-gateway-replicas-pods"]
    assert headless["spec"]["clusterIP"] == "None"
    assert stateful["spec"]["serviceName"] == "avatar-gateway-replicas-pods"


def test_compose_mounts_and_builds_files_that_exist() -> None:
    services = load_yaml(COMPOSE)["services"]
    build = services["gateway"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    prometheus_config = load_yaml(PROMETHEUS_CONFIG)
    job = next(j for j in prometheus_config["scrape_configs"] if j["job_name"] == "avatar-gateway")
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    assert services["gateway"]["network_mode"] == "host"


# -- Kubernetes --------------------------------------------------------------------------------


def k8s_resources() -> dict[str, dict[str, Any]]:
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc
            for path in K8S for doc in load_yaml_documents(path)}


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    result = run(VENV_BIN / "kubernetes-validate", "--strict", *K8S)
    assert_ok(result)
    # It only warns (exit 0) about a kind it has no schema for: require a pass for each.
    assert "WARN" not in result.stdout and "ERROR" not in result.stdout, result.stdout
    passed = re.findall(r"passed for resource (\S+)", result.stdout)
    assert sorted(passed) == sorted(name.lower() for name in k8s_resources())


def _container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container = containers[0]
    assert isinstance(container, dict)
    return container


def test_deployment_runs_one_hardened_gateway_that_drains() -> None:
    resources = k8s_resources()
    deployment = resources["Deployment/avatar-gateway"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["enableServiceLinks"] is False  # else the Service injects AVATAR_GATEWAY_PORT
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    image_user = _only(dockerfile_stages()[-1], "USER").split(":")[0]
    assert str(pod["securityContext"]["runAsUser"]) == image_user
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e for e in container["env"]}
    assert "persistentVolumeClaim" in volumes[mounts[env["AVATAR_GATEWAY_STATE_DIR"]["value"]]]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The grace period covers the preStop sleep plus a provider stop call with its retries.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    worst_stop = Settings().upstream_timeout * RetryPolicy().attempts
    assert pod["terminationGracePeriodSeconds"] >= float(sleep[1]) + worst_stop
    # Secrets come from the Secret, as files.
    secret = resources["Secret/avatar-gateway"]
    secret_dir = mounts_of(container, volumes, "secret")
    for name, variable in env.items():
        if name.endswith("_FILE"):
            path = Path(variable["value"])
            assert path.parent == secret_dir and path.name in secret["stringData"], name
        if "valueFrom" in variable and "secretKeyRef" in variable["valueFrom"]:
            assert variable["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"], name
    assert "AVATAR_GATEWAY_API_TOKEN_FILE" in env
    service = resources["Service/avatar-gateway"]
    assert [p["protocol"] for p in service["spec"]["ports"]] == ["TCP"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()


def mounts_of(container: Mapping[str, Any], volumes: Mapping[str, Any], kind: str) -> Path:
    paths = [Path(m["mountPath"]) for m in container["volumeMounts"] if kind in volumes[m["name"]]]
    assert len(paths) == 1
    return paths[0]


# -- settings named by the kit -----------------------------------------------------------------

_SECRET_FIELDS = {f.name for f in fields(Settings) if f.type == "Secret"}
_ALIASES = {"OPENAI_API_KEY", "OPENAI_BASE_URL"}


def is_setting(variable: str) -> bool:
    name = variable.removeprefix(ENV_PREFIX).lower()
    if variable.endswith("_FILE") and name.removesuffix("_file") in _SECRET_FIELDS:
        return True
    return name in {f.name for f in fields(Settings)}


def test_every_gateway_variable_the_kit_names_is_a_setting() -> None:
    files = [DOCKERFILE, COMPOSE, COMPOSE_REPLICAS, ALERTS, DEPLOY / "README.md",
             DEPLOY / "livekit" / "values.example.yaml", *K8S]
    named = {(path.name, variable) for path in files
             for variable in re.findall(r"\bAVATAR_GATEWAY_[A-Z0-9_]*[A-Z0-9]",
                                        path.read_text(encoding="utf-8"))}
    assert len(named) > 20
    assert [(file, v) for file, v in sorted(named) if not is_setting(v)] == []


def settings_from(environ: Mapping[str, str], tmp_path: Path) -> Settings:
    """``Settings.from_env`` on ``environ``, with every ``*_FILE`` pointed at a real file."""
    ready = dict(environ)
    for name in environ:
        if name.endswith("_FILE"):
            path = tmp_path / name
            path.write_text("a-secret-value\n")
            ready[name] = str(path)
    return Settings.from_env(ready)


def test_the_deployment_environment_is_a_valid_configuration(tmp_path: Path) -> None:
    container = _container(k8s_resources()["Deployment/avatar-gateway"])
    environ = {}
    for variable in container["env"]:
        if "value" in variable:
            environ[variable["name"]] = str(variable["value"])
        elif "fieldRef" in variable["valueFrom"]:
            environ[variable["name"]] = "10.1.2.3"
        else:
            environ[variable["name"]] = "from-the-secret"
    settings = settings_from(environ, tmp_path)
    assert settings.host == "0.0.0.0" and settings.api_token and settings.log_format == "json"
    assert settings.heygen_api_key and settings.ice_credential
    # aiortc takes the first TURN URL for the gateway's own relay: it must be TURN over UDP;
    # browsers also get the TLS-on-443 fallback.
    servers = rtc_configuration(settings.ice_servers, settings.ice_username, "x").iceServers
    assert servers is not None
    relay = connection_kwargs(servers)
    assert relay["turn_transport"] == "udp" and not relay["turn_ssl"]
    assert any(url.startswith("turns:") and ":443" in url for url in settings.ice_servers)


def test_the_compose_environment_is_a_valid_configuration(tmp_path: Path) -> None:
    gateway_env = load_yaml(COMPOSE)["services"]["gateway"]["environment"]
    # ${NAME:-} is empty when the shell does not set NAME.
    environ = {name: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
               for name, value in gateway_env.items()}
    settings = settings_from(environ, tmp_path)
    assert settings.host == "0.0.0.0" and settings.port == 8080 and settings.api_token


# -- Dockerfile --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile_stages() -> list[list[Instruction]]:
    """Instructions per build stage (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n(?:\s*#[^\n]*\n)*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    stages: list[list[Instruction]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        elif not stages:
            assert instruction.keyword == "ARG", f"{keyword} before the first FROM"
            continue
        stages[-1].append(instruction)
    return stages


def _only(stage: list[Instruction], keyword: str) -> str:
    found = [i.arguments for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def dockerfile_env(stage: list[Instruction]) -> dict[str, str]:
    """The ENV of a stage, ``${ARG}`` replaced by the ARG's default."""
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword in ("ARG", "ENV"):
            for pair in shlex.split(instruction.arguments):
                name, _, value = pair.partition("=")
                value = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), value)
                (args if instruction.keyword == "ARG" else env)[name] = value
    return env


def test_dockerfile_is_multi_stage_non_root_healthchecked_and_secret_free() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    user = _only(final, "USER").split(":")[0]
    assert user not in ("root", "0"), "the final stage must not run as root"
    healthcheck = _only(final, "HEALTHCHECK")
    assert "/livez" in healthcheck
    assert json.loads(_only(final, "CMD")) == ["avatar-gateway", "serve"]
    assert _only(final, "EXPOSE") == "8080"
    assert _only(final, "STOPSIGNAL") == "SIGTERM"
    assert dockerfile_env(final)["AVATAR_GATEWAY_STATE_DIR"] in json.loads(_only(final, "VOLUME"))
    assert _only(final, "WORKDIR")
    # No secret values baked in: a variable named like a secret is empty or an _FILE path.
    secret_like = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)$")
    for stage in stages:
        for instruction in stage:
            if instruction.keyword == "ENV":
                for name, value in dockerfile_env([instruction]).items():
                    assert not (secret_like.search(name) and value), f"{name} has a value"
            if instruction.keyword in ("ARG", "RUN", "LABEL"):
                assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)=[^\s\"]",
                                     instruction.arguments), instruction


def test_dockerfile_copies_what_the_gateway_needs_and_dockerignore_lets_it() -> None:
    stages = dockerfile_stages()
    final = stages[-1]
    # The demo pages: gateway.app serves web/ from beside the gateway package.
    assert Path(gateway.__file__).resolve().parent.parent / "web" == WEB_ROOT
    base = re.search(r"python:(\d+\.\d+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert base is not None
    site_packages = f"/opt/venv/lib/python{base[1]}/site-packages"
    copies = [i.arguments.split() for i in final if i.keyword == "COPY"]
    assert ["web", f"{site_packages}/web"] in copies
    assert f"python:{sys.version_info.major}.{sys.version_info.minor}" == f"python:{base[1]}"
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore should allow-list the build context"
    sources = {source for stage in stages for i in stage if i.keyword == "COPY"
               and not i.arguments.startswith("--from") for source in i.arguments.split()[:-1]}
    assert sources == {"pyproject.toml", "README.md", "gateway", "web"}
    for source in sources:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source
        assert (ROOT / source).exists(), source


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthcheck_commands() -> dict[str, list[str]]:
    dockerfile = re.search(r"CMD (\[.*\])", _only(dockerfile_stages()[-1], "HEALTHCHECK"))
    assert dockerfile is not None
    compose = load_yaml(COMPOSE)["services"]["gateway"]["healthcheck"]["test"]
    assert compose[0] == "CMD"
    return {"Dockerfile": json.loads(dockerfile[1]), "compose": list(compose[1:])}


def test_the_image_health_checks_pass_on_a_serving_gateway_and_fail_without(
        tmp_path: Path) -> None:
    """The image's command and environment (bound to loopback here), probed by its own
    health-check commands: exit 0 while it serves, non-zero once it has stopped."""
    port = free_port()
    image_env = dockerfile_env(dockerfile_stages()[-1])
    env = {**os.environ, **{k: v for k, v in image_env.items() if k.startswith(ENV_PREFIX)},
           "AVATAR_GATEWAY_HOST": "127.0.0.1", "AVATAR_GATEWAY_PORT": str(port),
           "AVATAR_GATEWAY_STATE_DIR": str(tmp_path), "AVATAR_GATEWAY_API_TOKEN": "t0ken",
           "AVATAR_GATEWAY_DEFAULT_QUALITY": "low", "http_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}  # the checks must not go through a proxy
    commands = healthcheck_commands()
    commands["compose"] = [part.replace(":8080/", f":{port}/") for part in commands["compose"]]

    def probe(command: list[str]) -> int:
        assert command[0] == "python"
        return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                              timeout=TIMEOUT, check=False).returncode

    proc = subprocess.Popen([str(VENV_BIN / "avatar-gateway"), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        f"http://127.0.0.1:{port}/livez", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the gateway never answered /livez"
                time.sleep(0.1)
        for name, command in commands.items():
            assert probe(command) == 0, f"{name} health check failed on a serving gateway"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for name, command in commands.items():
        assert probe(command) != 0, f"{name} health check passed with no gateway"


def test_the_image_refuses_to_serve_without_a_token() -> None:
    """The image binds 0.0.0.0; without a token the gateway exits with a message."""
    image_env = dockerfile_env(dockerfile_stages()[-1])
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({k: v for k, v in image_env.items() if k.startswith(ENV_PREFIX)})
    result = subprocess.run([str(VENV_BIN / "avatar-gateway"), "serve"], env=env,
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 2
    assert "refusing to bind 0.0.0.0 without authentication" in result.stderr
