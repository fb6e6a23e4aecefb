"""The deployment files are valid, and what they name is what the code reads and exports.

No Docker here: each file is checked by the tool that will read it, where it can run without an
engine or a cluster. ``docker-compose config`` (Debian's docker-compose 1.29) renders
docker-compose.yml, ``promtool`` checks the Prometheus config and rules and runs the alerts' unit
tests, ``kubectl kustomize`` renders deploy/kubernetes. The environment variables they set must be
settings the code reads, the ports and probe paths the code's defaults, and every metric the
dashboard and the alerts query must be exported by a running worker or ingress (scraped below).

``make deploy-tools`` installs the tools (CI runs it as root); a tool still missing fails the
check in CI or as root, and skips it otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis.asyncio as aioredis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from llmstream.core.settings import ServiceSettings, redact_url
from llmstream.devtools.simulator import SimulatorServer, SimulatorSettings
from llmstream.ingress.app import create_app
from llmstream.ingress.settings import IngressSettings
from llmstream.processors.providers.settings import ProviderSettings
from llmstream.processors.settings import WorkerSettings
from tests.harness import running_worker, serve_app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "llmstream.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
KUSTOMIZE = DEPLOY / "kubernetes"
WORKER_PORT = WorkerSettings().http_port
INGRESS_PORT = IngressSettings().port
TOPICS = ServiceSettings()
LLMSTREAM_SERVICES = ("worker", "ingress", "simulator")


def tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    message = (
        f"{name} is not installed: `make deploy-tools` installs it "
        "(apt-get install docker-compose prometheus kubernetes-client)"
    )
    if os.environ.get("CI") or os.geteuid() == 0:
        pytest.fail(message)
    pytest.skip(message)


def run(*args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        # Only what the tools need: a developer's provider keys must not leak into the render.
        env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")},
    )
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def known_variables() -> set[str]:
    """Every environment variable a deployable reads, from the settings classes themselves."""
    classes: list[type[BaseSettings]] = [
        WorkerSettings,
        IngressSettings,
        ProviderSettings,
        SimulatorSettings,
    ]
    names: set[str] = set()
    for cls in classes:
        prefix = str(cls.model_config.get("env_prefix") or "")
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names |= {c.upper() for c in alias.choices if isinstance(c, str)}
            elif isinstance(alias, str):
                names.add(alias.upper())
            else:
                names.add(f"{prefix}{name}".upper())
    return names


# -- docker-compose -------------------------------------------------------------------------------


def compose(env_file: Path) -> dict[str, Any]:
    """docker-compose.yml as docker-compose renders it with ``env_file`` for .env."""
    rendered = run(
        tool("docker-compose"), "--env-file", str(env_file), "-f", str(COMPOSE), "config"
    )
    config: dict[str, Any] = yaml.safe_load(rendered)
    return config


@pytest.fixture(scope="module")
def compose_default(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    empty = tmp_path_factory.mktemp("compose") / "empty.env"
    empty.write_text("")
    return compose(empty)


def test_compose_stack_starts_in_order_on_kafka_kraft(compose_default: dict[str, Any]) -> None:
    services = compose_default["services"]
    assert set(services) >= {"kafka", "kafka-init", "redis", "worker", "ingress", "simulator"}
    assert set(services) >= {"prometheus", "grafana"}

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert kafka["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "healthcheck" in kafka

    # The five topics the code uses, with partitions and a retention each.
    script = "\n".join(services["kafka-init"]["command"])
    created = {
        m.group(1): (int(m.group(2)), int(m.group(3)))
        for m in re.finditer(r"^create (\S+) (\d+) (\d+)", script, re.MULTILINE)
    }
    topics = [TOPICS.requests_topic, TOPICS.responses_topic, TOPICS.metrics_topic]
    assert sorted(created) == sorted([*topics, TOPICS.errors_topic, TOPICS.chunks_topic])
    assert all(partitions >= 4 for partitions, _ in created.values())
    # Errors are kept longer than requests: that is the time there is to replay them.
    assert created[TOPICS.errors_topic][1] > created[TOPICS.requests_topic][1]
    assert "--if-not-exists" in script

    redis = services["redis"]
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert "/data" in _volumes(redis)

    for name in ("worker", "ingress"):
        service = services[name]
        assert service["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"

    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N
    assert worker["command"] == ["worker"]
    assert worker["healthcheck"]["test"][-1] == f"http://127.0.0.1:{WORKER_PORT}/ready"
    ingress = services["ingress"]
    assert ingress["healthcheck"]["test"][-1] == f"http://127.0.0.1:{INGRESS_PORT}/ready"
    assert str(INGRESS_PORT) in str(ingress["ports"][0])
    assert services["simulator"]["profiles"] == ["demo"]

    known = known_variables()
    for name in LLMSTREAM_SERVICES:
        unknown = set(services[name]["environment"]) - known
        assert not unknown, f"{name}: variables no setting reads: {sorted(unknown)}"
    env = worker["environment"]
    assert env["LLMSTREAM_KAFKA_IDEMPOTENT_PRODUCER"] == "true"  # Apache Kafka grants IDs
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


def worker_drain_bound_s() -> float:
    """How long a worker's drain may take with the default settings: waiting requests get
    ``LLMSTREAM_SHUTDOWN_GRACE_S``, calls in flight are never cut and end within
    ``LLMSTREAM_PROVIDER_TIMEOUT_S``; then storing, emitting and the commit (15 s of room). A
    stop grace period shorter than this kills calls the next owner pays for again."""
    grace = WorkerSettings.model_fields["shutdown_grace_s"].default
    return float(max(grace, ProviderSettings.model_fields["timeout_s"].default) + 15)


def test_compose_gives_the_worker_its_drain(compose_default: dict[str, Any]) -> None:
    stop = compose_default["services"]["worker"]["stop_grace_period"]
    minutes, _, seconds = stop.rstrip("s").rpartition("m")
    assert int(minutes or 0) * 60 + int(seconds or 0) >= worker_drain_bound_s()


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a rendered service's volumes (v1 renders strings, v2 mappings)."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out[volume["target"]] = str(volume.get("source", ""))
        else:
            source, target, *_mode = str(volume).split(":")
            out[target] = source
    return out


def test_compose_mounts_the_prometheus_and_grafana_files(compose_default: dict[str, Any]) -> None:
    services = compose_default["services"]
    mounts = _volumes(services["prometheus"])
    assert Path(mounts["/etc/prometheus"]) == DEPLOY / "prometheus"
    mounts = _volumes(services["grafana"])
    assert Path(mounts["/etc/grafana/provisioning"]) == DEPLOY / "grafana" / "provisioning"
    assert Path(mounts["/var/lib/grafana/dashboards"]) == DASHBOARD.parent
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "llmstream.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_the_demo_env_points_the_worker_at_the_simulator() -> None:
    config = compose(DEPLOY / "demo.env")
    env = config["services"]["worker"]["environment"]
    sim_port = config["services"]["simulator"]["environment"]["LLMSTREAM_SIM_PORT"]
    assert env["OPENAI_BASE_URL"] == f"http://simulator:{sim_port}/v1"
    assert env["ANTHROPIC_BASE_URL"] == f"http://simulator:{sim_port}"
    assert "COMPOSE_PROFILES=demo" in (DEPLOY / "demo.env").read_text().splitlines()


def test_env_example_documents_every_compose_variable() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    example = ROOT / ".env.example"
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", example.read_text(), re.MULTILINE))
    assert used - documented == set(), "in docker-compose.yml, not in .env.example"
    assert documented - used == set(), "in .env.example, not used by docker-compose.yml"
    compose(example)  # and a copy of it is a valid .env


# -- Prometheus -----------------------------------------------------------------------------------


def test_prometheus_config_and_rules_are_valid() -> None:
    promtool = tool("promtool")
    run(promtool, "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    run(promtool, "check", "rules", "alerts.yml", cwd=DEPLOY / "prometheus")


def test_alerts_fire_on_what_they_name() -> None:
    run(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=DEPLOY / "prometheus")


def test_prometheus_scrapes_every_replica_on_the_codes_ports() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker = jobs["llmstream-worker"]["dns_sd_configs"][0]
    ingress = jobs["llmstream-ingress"]["dns_sd_configs"][0]
    assert (worker["names"], worker["port"]) == (["worker"], WORKER_PORT)
    assert (ingress["names"], ingress["port"]) == (["ingress"], INGRESS_PORT)


# -- Grafana and metric names ---------------------------------------------------------------------

_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "Inf", "NaN",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue  # a function or an aggregation, or a keyword
        names.add(match.group())
    return names


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(a_seconds_bucket{x="y z"}[5m])))'
        " / on(instance) group_left(pod) b_total offset 5m and bool c > 0 or absent(d)"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d"}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_dashboard_is_provisionable_and_its_queries_parse(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "llmstream"
    [variable] = dashboard["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    # Every query is valid PromQL: promtool parses them as recording rules.
    queries = [q.replace("$__rate_interval", "5m") for q in dashboard_queries()]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    run(tool("promtool"), "check", "rules", str(path))
    titles = " ".join(p["title"].lower() for p in panels)
    for what in ("status", "latency", "tokens", "cost", "retries", "dedup", "in flight", "lag"):
        assert what in titles


def exported_names(exposition: str) -> set[str]:
    """The series names a /metrics page lets a query select."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}{s}" for s in ("_bucket", "_sum", "_count", "_created")}
        elif family.type == "summary":
            names |= {family.name, f"{family.name}_sum", f"{family.name}_count"}
        else:
            names.add(family.name)
    return names


@pytest.mark.integration
async def test_dashboard_and_alerts_query_what_the_worker_and_ingress_export(
    settings: ServiceSettings,
    simulator: SimulatorServer,
    redis_client: aioredis.Redis,
    unique: str,
    tmp_path: Path,
) -> None:
    # Redis with a user and password (an ACL user of the session's Redis), so this test also
    # shows the password never reaches an endpoint or the worker's log.
    user, password = f"llmstream-{unique}", f"pw-{unique}-do-not-show"
    url = urlsplit(settings.redis_url)
    assert url.password is None
    await redis_client.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all"
    )
    secured = settings.model_copy(
        update={"redis_url": urlunsplit(url._replace(netloc=f"{user}:{password}@{url.netloc}"))}
    )
    ingress = IngressSettings(**{**secured.model_dump(), "listener_fetch_max_wait_ms": 50})
    lag = f'llmstream_consumer_lag_messages{{partition="0",topic="{settings.requests_topic}"}}'
    lag_every = {"LLMSTREAM_CONSUMER_LAG_INTERVAL_S": "0.5"}
    group = f"g-{unique}"
    try:
        async with running_worker(secured, simulator.url, group, tmp_path, **lag_every) as worker:
            async with serve_app(create_app(ingress)) as base, httpx.AsyncClient() as client:
                pages = {
                    "worker": (await client.get(worker.url("/metrics"))).text,
                    "ingress": (await client.get(f"{base}/metrics")).text,
                    "worker /ready": (await client.get(worker.url("/ready"))).text,
                    "ingress /ready": (await client.get(f"{base}/ready")).text,
                }
                for _ in range(50):  # the lag sampler's first round
                    if lag in pages["worker"]:
                        break
                    await asyncio.sleep(0.1)
                    pages["worker"] = (await client.get(worker.url("/metrics"))).text
            healthcheck = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llmstream.cli", "healthcheck", worker.url("/health"),
                stdout=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            assert await healthcheck.wait() == 0
    finally:
        await redis_client.execute_command("ACL", "DELUSER", user)
    exported = exported_names(pages["worker"]) | exported_names(pages["ingress"]) | {"up"}
    for source, queries in (("dashboard", dashboard_queries()), ("alerts", alert_queries())):
        used = set().union(*(metric_names(q) for q in queries))
        missing = used - exported
        assert not missing, f"the {source} queries metrics nothing exports: {sorted(missing)}"
    assert lag in pages["worker"], "the worker samples its group's consumer lag"
    assert '"redis":"ok"' in pages["worker /ready"].replace(" ", "")
    for name, page in [*pages.items(), ("worker log", worker.log())]:
        assert password not in page, f"the Redis password shows in the {name}"


# -- Kubernetes -----------------------------------------------------------------------------------


def kustomize(target: str) -> list[dict[str, Any]]:
    rendered = run(tool("kubectl"), "kustomize", str(KUSTOMIZE / target))
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only  # type: ignore[no-any-return]


def probe_target(spec: dict[str, Any], probe: str) -> tuple[str, int]:
    get = spec[probe]["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in spec["ports"] if p["name"] == port)
    return get["path"], port


@pytest.mark.parametrize("target", ["base", "overlays/dev", "overlays/prod"])
def test_kubernetes_manifests_render_with_probes_on_the_real_endpoints(target: str) -> None:
    objects = kustomize(target)
    deployments = by_kind(objects, "Deployment")
    worker, ingress = deployments["llmstream-worker"], deployments["llmstream-ingress"]

    spec = container(worker)
    assert spec["args"] == ["worker"]
    assert probe_target(spec, "readinessProbe") == ("/ready", WORKER_PORT)
    assert probe_target(spec, "livenessProbe") == ("/health", WORKER_PORT)
    assert probe_target(spec, "startupProbe") == ("/health", WORKER_PORT)
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(WORKER_PORT)
    spec = container(ingress)
    assert spec["args"] == ["ingress"]
    assert probe_target(spec, "readinessProbe") == ("/ready", INGRESS_PORT)
    assert probe_target(spec, "livenessProbe") == ("/health", INGRESS_PORT)

    [service] = [
        s for s in by_kind(objects, "Service").values() if "ingress" in s["metadata"]["name"]
    ]
    assert (
        service["spec"]["selector"].items()
        <= ingress["spec"]["template"]["metadata"]["labels"].items()
    )
    target_port = service["spec"]["ports"][0]["targetPort"]
    assert target_port in {p["name"] for p in spec["ports"]} | {INGRESS_PORT}

    pod = worker["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= worker_drain_bound_s()

    [hpa] = by_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "llmstream-worker"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdbs = by_kind(objects, "PodDisruptionBudget")
    for name, deployment in (("llmstream-worker", worker), ("llmstream-ingress", ingress)):
        selector = pdbs[name]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container(deployment)["securityContext"]["readOnlyRootFilesystem"] is True

    # The configuration is variables the code reads, in the ConfigMap the pods load.
    config_maps = by_kind(objects, "ConfigMap")
    [config_name] = [n for n in config_maps if n.startswith("llmstream-config")]
    assert {"configMapRef": {"name": config_name}} in container(worker)["envFrom"]
    unknown = set(config_maps[config_name]["data"]) - known_variables()
    assert not unknown, f"variables no setting reads: {sorted(unknown)}"
    assert config_maps[config_name]["data"]["LLMSTREAM_KAFKA_IDEMPOTENT_PRODUCER"] == "true"

    secrets = by_kind(objects, "Secret")
    secret_refs = {e["secretRef"]["name"] for e in container(worker)["envFrom"] if "secretRef" in e}
    if target == "overlays/dev":
        [secret] = secrets  # the simulator's placeholders
        assert secret_refs == {secret}
    else:
        # Real credentials are created out of band: applying never overwrites them.
        assert secrets == {} and secret_refs == {"llmstream-secrets"}


def _as_settings(env: dict[str, str]) -> dict[str, Any]:
    """Environment variables (as a ConfigMap holds them) -> WorkerSettings arguments."""
    aliases = {"KAFKA_BOOTSTRAP_SERVERS": "kafka_bootstrap_servers", "REDIS_URL": "redis_url"}
    out: dict[str, Any] = {}
    for name, value in env.items():
        field = aliases.get(name) or name.removeprefix("LLMSTREAM_").lower()
        if field in WorkerSettings.model_fields:
            out[field] = value
    return out


def test_prod_overlay_speaks_sasl_ssl_with_the_clusters_ca() -> None:
    objects = kustomize("overlays/prod")
    [config] = by_kind(objects, "ConfigMap").values()
    env = config["data"]
    # With the Secret's SASL credentials, the ConfigMap makes valid settings.
    settings = WorkerSettings(
        **_as_settings(env), kafka_sasl_username="llmstream", kafka_sasl_password="from-secret"
    )
    assert (settings.kafka_security_protocol, settings.kafka_sasl_mechanism) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
    )
    assert settings.kafka_compression == "zstd"
    for deployment in by_kind(objects, "Deployment").values():
        mounts = {m["mountPath"] for m in container(deployment)["volumeMounts"]}
        assert str(Path(env["LLMSTREAM_KAFKA_SSL_CAFILE"]).parent) in mounts


def test_the_secret_template_holds_no_secret() -> None:
    template = yaml.safe_load((KUSTOMIZE / "base" / "secret.yaml").read_text())
    assert template["kind"] == "Secret"
    values = template["stringData"]
    assert set(values) <= known_variables()
    for name, value in values.items():
        if name == "REDIS_URL":
            assert redact_url(value) == value, "no password in the template's Redis URL"
        else:
            assert value == "", f"{name} must be empty in the template"
    # Every secret the pods need has its place in the template.
    assert {"REDIS_URL", "OPENAI_API_KEY", "LLMSTREAM_KAFKA_SASL_PASSWORD"} <= set(values)


# -- the image ------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    lines = _instructions((DEPLOY / "Dockerfile").read_text())
    stages = [i for i, (op, _) in enumerate(lines) if op == "FROM"]
    assert len(stages) >= 2
    final = lines[stages[-1] :]
    builder = lines[: stages[-1]]
    ops = {op for op, _ in final}
    assert {"USER", "HEALTHCHECK", "ENTRYPOINT"} <= ops
    [user] = [arg for op, arg in final if op == "USER"]
    assert user.split(":")[0] not in {"0", "root"}
    [healthcheck] = [arg for op, arg in final if op == "HEALTHCHECK"]
    assert '["llmstream", "healthcheck"]' in healthcheck
    assert [arg for op, arg in final if op == "ENTRYPOINT"] == ['["llmstream"]']
    assert not any("build-essential" in arg for op, arg in final if op == "RUN")
    assert any("build-essential" in arg for op, arg in builder if op == "RUN")
    # Dependencies from pyproject.toml alone, in a layer before any code is copied.
    copies = [arg for op, arg in builder if op == "COPY"]
    assert copies[0].startswith("pyproject.toml")
    runs = [arg for op, arg in builder if op == "RUN"]
    assert any("requirements.txt" in arg and "pip install" in arg for arg in runs)
    # The llmstream package is copied in with every top-level folder it links to (schemas/,
    # processors/, ingress/), or its links would dangle in the image.
    linked = {path.readlink().name for path in (ROOT / "llmstream").iterdir() if path.is_symlink()}
    packages = {"llmstream", *linked}
    assert {"schemas", "processors", "ingress"} <= packages
    copied = {arg.split()[0] for arg in copies}
    assert packages <= copied
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert {f"!{p}/" for p in packages} <= set(ignore)


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", dockerfile)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, arg = line.partition(" ")
            out.append((op.upper(), " ".join(arg.split())))
    return out


def test_the_healthcheck_command_answers_for_the_running_service() -> None:
    # Nothing listens on the defaults here: unhealthy, and it says where it looked.
    result = subprocess.run(
        [sys.executable, "-m", "llmstream.cli", "healthcheck", "http://127.0.0.1:9/health"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "nothing answers at http://127.0.0.1:9/health" in result.stderr
