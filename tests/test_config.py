"""Config: YAML + env, one clear message naming the key, CLI exit codes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wa_router.cli import main
from wa_router.config import load_config
from wa_router.demo import demo_config
from wa_router.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

BASE = """
instances:
  - {name: a, url: "http://127.0.0.1:3001"}
  - {name: b, url: "http://127.0.0.1:3002"}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "router.yaml"
    p.write_text(text)
    return p


def test_shipped_config_is_the_demo_default() -> None:
    import dataclasses

    from wa_router.config import UpstreamConfig

    cfg = load_config(ROOT / "conf" / "router.yaml", {})
    # The demo adds only its instances' api key (so that its sync can list them).
    assert cfg == dataclasses.replace(demo_config(webhooks=False), upstream=UpstreamConfig())


def test_env_overrides_nested_keys(tmp_path: Path) -> None:
    env = {
        "WA_ROUTER_SERVER__PORT": "9001",
        "WA_ROUTER_DISCOVERY__PROBE_TIMEOUT_S": "0.25",
        "WA_ROUTER_UPSTREAM__API_KEY": "node-secret",
        "WA_ROUTER_UPSTREAM__CLIENT_KEYS": "[k1, k2]",
        "OTHER": "ignored",
    }
    cfg = load_config(write(tmp_path, BASE), env)
    assert cfg.server.port == 9001
    assert cfg.discovery.probe_timeout_s == 0.25
    assert cfg.upstream.client_keys == ("k1", "k2")


def test_config_file_from_env(tmp_path: Path) -> None:
    p = write(tmp_path, BASE)
    cfg = load_config(None, {"WA_ROUTER_CONFIG": str(p)})
    assert [i.name for i in cfg.instances] == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "env", "key", "words"),
    [
        (BASE + "servr: {port: 1}\n", {}, "servr", "unknown key"),
        (BASE + "discovery: {probe_timout_s: 1}\n", {}, "discovery.probe_timout_s", "unknown key"),
        ("instances: [{name: a, url: 'ftp://x:1'}]\n", {}, "instances[0].url", "http://"),
        ("instances: [{name: a, url: 'not a url'}]\n", {}, "instances[0].url", "http://"),
        ("instances: [{name: a, url: 'http://h:1/path'}]\n", {}, "instances[0].url", "no path"),
        (
            BASE + "  - {name: a, url: 'http://127.0.0.1:3009'}\n",
            {},
            "instances[2].name",
            "duplicate",
        ),
        (
            BASE + "  - {name: c, url: 'http://127.0.0.1:3001'}\n",
            {},
            "instances[2].url",
            "already instance",
        ),
        (BASE + "discovery: {negative_ttl_s: -1}\n", {}, "discovery.negative_ttl_s", "negative"),
        (
            BASE,
            {"WA_ROUTER_UPSTREAM__CONNECT_TIMEOUT_S": "-2"},
            "upstream.connect_timeout_s",
            "negative",
        ),
        (BASE + "server: {port: high}\n", {}, "server.port", "integer"),
        (BASE, {"WA_ROUTER_NOPE": "1"}, "nope", "unknown key"),
        ("instances: []\n", {}, "instances", "at least one"),
        ("server: {port: 1}\n", {}, "instances", "required"),
        (BASE + "upstream: {client_keys: [c]}\n", {}, "upstream.client_keys", "api_key"),
        (BASE + "admin: {token: short}\n", {}, "admin.token", "16 characters"),
        (BASE + "profile: {name: waha}\n", {}, "profile.name", "not one of"),
        (
            BASE + "rules: [{name: r, path: '/x/{session}', session_in: body, field: s}]\n",
            {},
            "rules[0].path",
            "{session}",
        ),
        (BASE + "rules: [{name: r, path: /x, session_in: body}]\n", {}, "rules[0].field", "names"),
        (
            BASE + "rules: [{name: r, path: '/**/x', kind: any_instance, session_in: none}]\n",
            {},
            "rules[0].path",
            "last",
        ),
        (
            BASE + "limits: {session_id_pattern: '['}\n",
            {},
            "limits.session_id_pattern",
            "regular expression",
        ),
        (BASE + "store: {sentinels: [nohost]}\n", {}, "store.sentinels[0]", "host:port"),
        (BASE + "store: {sentinels: ['h:99999']}\n", {}, "store.sentinels[0]", "host:port"),
        (
            BASE + "profile: {not_here: [{http_status: 200}]}\n",
            {},
            "profile.not_here[0].http_status",
            "4xx or 5xx",
        ),
        (
            BASE + "profile: {not_here: [{http_status: 409, means: maybe}]}\n",
            {},
            "profile.not_here[0].means",
            "not one of",
        ),
        (
            BASE + "webhooks: {advertise_url: 'ftp://x'}\n",
            {},
            "webhooks.advertise_url",
            "http",
        ),
        (
            BASE + "server: {host: 0.0.0.0}\nwebhooks: {laravel_url: 'http://l:1'}\n",
            {},
            "webhooks.advertise_url",
            "Laravel reaches it",
        ),
        (
            BASE + "webhooks: {hold_login_events_s: 300}\n",
            {},
            "webhooks.hold_login_events_s",
            "window_s",
        ),
        (
            BASE + "webhooks: {inflight_s: 1, relay_timeout_s: 5}\n",
            {},
            "webhooks.inflight_s",
            "relay_timeout_s",
        ),
        (
            BASE + "webhooks: {claim_after_s: 15, relay_timeout_s: 10}\n",
            {},
            "webhooks.claim_after_s",
            "relay_timeout_s",
        ),
        (BASE + "webhooks: {backlog: kafka}\n", {}, "webhooks.backlog", "kafka"),
        (BASE + "webhooks: {backlog: redis}\n", {}, "webhooks.backlog", "store.kind"),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, text: str, env: dict[str, str], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env)
    assert info.value.key == key
    assert words in info.value.message


def test_check_config_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(write(tmp_path, BASE))]) == 0
    assert "OK (2 instances" in capsys.readouterr().out
    assert main(["check-config", str(write(tmp_path, BASE + "bogus: 1\n"))]) == 2
    err = capsys.readouterr().err
    assert "bogus: unknown key" in err
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2


def test_console_script_exits_2_on_bad_config(tmp_path: Path) -> None:
    bad = write(tmp_path, BASE + "discovery: {probe_timeout_s: -1}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "wa_router.cli", "serve", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "discovery.probe_timeout_s" in proc.stderr


def test_several_workers_relay_webhooks_only_with_the_redis_backlog(tmp_path: Path) -> None:
    from wa_router.server import serve_workers

    hooks = "webhooks: {secrets: [s], laravel_url: 'http://l:1'}\n"
    cfg = load_config(write(tmp_path, BASE + hooks))
    with pytest.raises(ConfigError) as info:
        serve_workers(cfg, workers=2)
    assert info.value.key == "--workers" and "store.kind: redis" in info.value.message


@pytest.mark.parametrize(
    ("change", "live", "restart"),
    [
        ("log: {level: debug}\n", ["log.level"], []),
        ("webhooks: {secrets: [a, b]}\n", ["webhooks.secrets"], []),
        ("discovery: {probe_timeout_s: 1.5}\n", [], ["discovery.probe_timeout_s"]),
        ('  - {name: c, url: "http://127.0.0.1:3003"}\n', ["instances"], []),
        (
            "log: {level: error}\nserver: {port: 9999}\n",
            ["log.level"],
            ["server.port"],
        ),
        ("", [], []),
    ],
)
def test_a_reload_says_what_it_applies_and_what_needs_a_restart(
    tmp_path: Path, change: str, live: list[str], restart: list[str]
) -> None:
    from wa_router.reload import changed_keys, is_live

    old = load_config(write(tmp_path, BASE))
    new = load_config(write(tmp_path, BASE + change))
    changed = list(changed_keys(old, new))
    assert [k for k in changed if is_live(k)] == live
    assert [k for k in changed if not is_live(k)] == restart


@pytest.mark.parametrize(
    ("old", "new", "added", "expected"),
    [
        ([("a", False)], [("a", False)], [], []),
        ([("a", False)], [("a", True)], [], [("a", True)]),
        ([("a", True)], [("a", False)], [], [("a", False)]),
        ([("a", True)], [("a", True)], [], []),  # unchanged: an admin undrain stands
        ([], [("b", True)], ["b"], [("b", True)]),  # a new member, drained from the start
        ([], [("b", False)], ["b"], []),
        ([("a", True)], [("a", True)], ["a"], [("a", True)]),  # its URL changed: still drained
        ([("a", True)], [("a", False)], ["a"], [("a", False)]),  # moved and undrained
        ([("a", False)], [("a", False)], ["a"], []),  # moved: an operator's drain stands
    ],
)
def test_a_reload_drains_what_the_file_changed(
    old: list[tuple[str, bool]],
    new: list[tuple[str, bool]],
    added: list[str],
    expected: list[tuple[str, bool]],
) -> None:
    from wa_router.config import InstanceConfig
    from wa_router.reload import drain_changes

    def configs(rows: list[tuple[str, bool]]) -> list[InstanceConfig]:
        return [
            InstanceConfig(n, f"http://127.0.0.1:{3000 + i}", drain=d)
            for i, (n, d) in enumerate(rows)
        ]

    assert drain_changes(configs(old), configs(new), added) == expected


def test_the_shipped_example_documents_every_key(tmp_path: Path) -> None:
    """`wa-router init-config` writes it; every section and key of Config is in it."""
    import dataclasses

    import yaml

    from wa_router.config import Config

    target = tmp_path / "router.yaml"
    assert main(["init-config", str(target)]) == 0
    assert main(["init-config", str(target)]) == 2  # never overwritten by accident
    text = target.read_text()
    doc = yaml.safe_load(text)
    assert load_config(target).instances  # it loads as written

    def missing(cls: Any, section: Any, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if not isinstance(section, dict) or f.name not in section:
                # An optional key is shown commented out: `# name: example`.
                if not re.search(rf"^\s*#\s*{f.name}:", text, re.MULTILINE):
                    out.append(key)
                continue
            sub = section[f.name]
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                out += missing(f.default_factory, sub, key + ".")
        return out

    undocumented = [k for k in missing(Config, doc, "") if k != "rules"]
    assert undocumented == [], undocumented
