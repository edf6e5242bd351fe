"""deploy/: the Grafana dashboard and the Prometheus alert rules, against a
real gateway and a real Prometheus.

* ``promtool check rules`` accepts deploy/prometheus/alerts.yml;
* every ``edgegate_*`` metric the dashboard and the rules name is on a
  running gateway's /metrics (a gateway with everything that has metrics
  turned on: the NATS backbone with JetStream history, TLS, JWT keys from
  a JWKS);
* Debian's ``prometheus`` (loopback, a temporary config, 1 s scrapes, the
  alert rules loaded) scrapes that gateway while a few WebSocket clients
  publish, and every PromQL expression of the dashboard and the rules is
  evaluated through its HTTP API (/api/v1/query). "Returns data" means:
  the expression without its threshold comparison (``... > 0.9``) returns
  a non-empty result, so its metric names and label matchers match real
  series, and the whole expression evaluates without error; Prometheus'
  own evaluation of every rule is healthy (/api/v1/rules); and a few
  figures must show the load (connections, envelopes/s, backbone up, the
  certificate's remaining days).

Grafana itself is not installable here; the dashboard's template
variables are substituted as Grafana would ($job, $instance as its "All"
regex, $__rate_interval, $__range).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

import egproto
from conftest import REPO, Gateway, free_port, http_get, make_env
from jwkshelp import JwksServer, Key, jwks_env
from natshelp import NatsServer, nats_env, require_backbone
from test_tls import HOST, Pki, tls_env

DASHBOARD = REPO / "deploy" / "grafana" / "edgegate.json"
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
JOB = "edgegate"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("EG_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(f"{name} not found (scripts/test.sh installs Debian's prometheus package)")
    pytest.skip(f"{name} not installed (apt-get install prometheus)")


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for inner in [p] + p.get("panels", []):
            for t in inner.get("targets", []):
                out.append((inner["title"], t["expr"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


def grafana(expr: str) -> str:
    """The expression as Grafana sends it with job=edgegate and every node."""
    return (expr.replace("$job", JOB).replace("$instance", ".*")
            .replace("$__rate_interval", "30s").replace("$__range", "5m"))


_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def without_threshold(expr: str) -> str:
    """The left side of the expression's top-level comparison (outside any
    parentheses, label matchers, ranges and strings), or the expression."""
    depth, quote, i = 0, None, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for op in _COMPARISONS:
                if expr.startswith(op, i):
                    return expr[:i].strip()
        i += 1
    return expr.strip()


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bedgegate_[a-z0-9_]+", expr))


def test_without_threshold_keeps_matchers_and_cuts_comparisons():
    assert without_threshold('sum(rate(x{code="4003",a!="b"}[5m])) > 0.1') == 'sum(rate(x{code="4003",a!="b"}[5m]))'
    assert without_threshold("min(y) - time() < 14 * 86400") == "min(y) - time()"
    assert without_threshold('up{job="edgegate"} == 0') == 'up{job="edgegate"}'
    assert without_threshold("sum(z)") == "sum(z)"


def test_promtool_accepts_the_rules():
    promtool = _tool("promtool")
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert f"SUCCESS: {len(rule_exprs())} rules found" in r.stdout.decode()


def test_the_dashboard_is_importable_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= names
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]


# --------------------------------------------------------------------------
# a gateway with every metric family on, under a little load


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """NATS (JetStream) + a gateway with TLS on its WebSocket listener and
    JWT keys from a JWKS endpoint."""
    require_backbone(tmp_path_factory)
    d = tmp_path_factory.mktemp("deploy")
    nats = NatsServer(d, "js", jetstream=True).start()
    signer = Key("ES256")
    jwks = JwksServer(signer)
    pki = Pki(d / "pki")
    cert, key = pki.leaf()
    chain, keyp = pki.write(cert, key)
    env = make_env(**nats_env(nats.url, "deploy", EDGEGATE_BACKBONE__NATS__HISTORY="jetstream"),
                   **tls_env(chain, keyp), **jwks_env(jwks.url, "ES256"))
    gw = Gateway(env, d, "gateway")
    gw.pki = pki
    gw.cert = cert
    gw.signer = signer
    gw.start(wait_ready=True, timeout=30)
    yield gw
    problems = gw.stop()
    nats.stop()
    jwks.stop()
    assert not problems, f"{problems}\n{gw.stderr_tail()}"


async def load(gw, seconds: float) -> int:
    """Four WSS clients (permessage-deflate offered) in one room, each
    publishing chat-sized messages; one reconnects with `since` (a
    recovery). Returns the messages delivered."""
    url = f"wss://{HOST}:{gw.ws_port}/ws"
    clients = []
    for i in range(4):
        c = await egproto.WsClient.connect(url, ssl=gw.pki.client_ctx(), compression="deflate")
        await c.hello(f"deploy{i}", token=gw.signer.token(f"deploy{i}"))
        ok = await c.call("sub", ch="room:deploy")
        assert ok["t"] == "ok", ok
        clients.append(c)
    text = "a chat message long enough to be compressed " * 8
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for c in clients:
            ok = await c.call("pub", ch="room:deploy", d={"text": text, "n": sent})
            assert ok["t"] == "ok", ok
            sent += 1
        await asyncio.sleep(0.05)
    last = ok["seq"]
    r = await egproto.WsClient.connect(url, ssl=gw.pki.client_ctx())
    await r.hello("deploy-r", token=gw.signer.token("deploy-r"))
    ok = await r.call("sub", ch="room:deploy", meta={"since": {"seq": last - 2}})
    assert ok["t"] == "ok" and ok["meta"].get("recovered") is True, ok
    for c in clients + [r]:
        await c.close()
    return sent


def test_every_metric_the_deploy_files_name_is_on_metrics(node):
    st, text = http_get(node.admin + "/metrics")
    assert st == 200
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    named = set()
    for _, e in dashboard_exprs() + rule_exprs():
        named |= metric_names(e)
    assert len(named) >= 25, sorted(named)
    missing = sorted(named - exported)
    assert not missing, f"named by deploy/ but not exported: {missing}"
    # The certificate gauge is the served leaf's notAfter.
    want = int(node.cert.not_valid_after_utc.timestamp())
    assert node.metric("edgegate_tls_cert_expiry_timestamp_seconds") == want


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.dir = workdir
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [_tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_tail()
            try:
                if http_get(self.url("/-/ready"), timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("prometheus not ready:\n" + self.log_tail())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def api(self, path: str, **params) -> dict:
        st, body = http_get(self.url(path) + "?" + urllib.parse.urlencode(params), timeout=10)
        doc = json.loads(body)
        assert st == 200 and doc["status"] == "success", f"{path} {params}: {st} {body[:500]}"
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("/api/v1/query", query=expr)["result"]

    def log_tail(self) -> str:
        return (self.dir / "prometheus.log").read_text("utf-8", "replace")[-3000:]

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()


def test_prometheus_evaluates_every_expression_on_a_loaded_gateway(node, tmp_path):
    prom = Prometheus(tmp_path, f"127.0.0.1:{node.admin_port}")
    try:
        # Prometheus' discovery hands targets over every 5 s: wait for the
        # first scrape, then a few scrapes under load and a few after, so
        # rates have points.
        deadline = time.monotonic() + 20
        while not prom.query(f'up{{job="{JOB}"}}'):
            assert time.monotonic() < deadline, "no scrape within 20 s"
            time.sleep(0.2)
        sent = asyncio.run(load(node, 6.0))
        assert sent > 50
        time.sleep(3)
        up = prom.query(f'up{{job="{JOB}"}}')
        assert up and float(up[0]["value"][1]) == 1, up

        empty = []
        for where, expr in dashboard_exprs() + rule_exprs():
            q = grafana(expr)
            prom.query(q)  # the whole expression: no error
            if not prom.query(without_threshold(q)):
                empty.append(f"{where}: {without_threshold(q)}")
        assert not empty, "expressions with no data:\n" + "\n".join(empty)

        def value(title: str, legend_index: int = 0) -> float:
            exprs = [e for t, e in dashboard_exprs() if t == title]
            res = prom.query(without_threshold(grafana(exprs[legend_index])))
            return sum(float(r["value"][1]) for r in res)

        assert value("Envelopes/s") > 1
        assert value("Envelopes/s", 1) > 1
        assert value("Backbone messages/s") > 1
        assert value("Backbone up") == 1
        days = value("TLS certificate expires in")
        assert 1 < days < 3650, days
        ratio = value("Compression ratio (sent)")
        assert 0 < ratio < 1, ratio
        assert value("Recoveries by outcome") > 0
        assert value("JWKS keys") == 1

        # Prometheus' own evaluation of the rules: loaded, evaluated, healthy.
        deadline = time.monotonic() + 10
        while True:
            rules = [r for g in prom.api("/api/v1/rules")["groups"] for r in g["rules"]]
            pending = [r["name"] for r in rules if r.get("lastEvaluation", "").startswith("0001")]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(rules) == len(rule_exprs())
        assert not pending, pending
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, bad
        # Under this load nothing is wrong but the test certificate, which
        # expires in 7 days: that rule, and only it, is on its way to firing.
        alerts = {a["labels"]["alertname"]: a["state"] for a in prom.api("/api/v1/alerts")["alerts"]}
        assert alerts == {"EdgegateTLSCertificateExpiresSoon": "pending"}, alerts
    except AssertionError:
        print(prom.log_tail())
        raise
    finally:
        prom.stop()
