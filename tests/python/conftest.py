"""Fixtures for the Python client tests: a real RabbitMQ on 127.0.0.1:5672 and sluice in front of it.

* ``sluice`` starts sluice (binary from ``SLUICE_BIN``) with a config written into the test's tmp dir,
  on free ports, waits until its AMQP listener accepts and ``/healthz`` answers, and stops it with
  SIGTERM at the end. Its stderr goes to a file that is attached to the report of a failed test.
* ``broker`` talks to RabbitMQ directly (not through sluice): declares the test's queues, reads their
  depth with passive declares and deletes everything it declared at the end, even on failure.
* ``names`` gives names unique to one test run (queues, producers).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import logging

import pika
import pika.exceptions
import pytest

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
GUEST = pika.PlainCredentials("guest", "guest")
SLUICE_BIN = os.environ.get("SLUICE_BIN", "/var/tmp/sluice-target/debug/sluice")

STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 300

_logs_key = pytest.StashKey[list]()
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# pika logs every nack and return as a warning: hundreds of lines per test.
logging.getLogger("pika").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------
# Failure output: sluice's stderr next to the assertion that failed.


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for path in item.stash.get(_logs_key, []):
        try:
            lines = _ANSI.sub("", Path(path).read_text(errors="replace")).splitlines()
        except OSError as e:
            lines = [f"(could not read {path}: {e})"]
        if len(lines) > LOG_TAIL_LINES:
            lines = [f"... {len(lines) - LOG_TAIL_LINES} earlier lines in {path}"] + lines[
                -LOG_TAIL_LINES:
            ]
        report.sections.append((f"sluice stderr ({path})", "\n".join(lines)))


# --------------------------------------------------------------------------------------------
# Names


@dataclass
class Names:
    """Names unique to one test: ``names.queue("tasks")`` -> ``sluice-test.tasks.<id>``."""

    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    def queue(self, what: str) -> str:
        return f"sluice-test.{what}.{self.uid}"

    def producer(self, prefix: str) -> str:
        return f"{prefix}-{self.uid}"


@pytest.fixture
def names() -> Names:
    return Names()


# --------------------------------------------------------------------------------------------
# Direct broker access


def direct_params() -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        host=BROKER_HOST,
        port=BROKER_PORT,
        credentials=GUEST,
        connection_attempts=3,
        retry_delay=1,
        socket_timeout=10,
        blocked_connection_timeout=30,
        client_properties={"connection_name": "sluice-test-direct"},
    )


class Broker:
    """RabbitMQ at 127.0.0.1:5672, bypassing sluice."""

    def __init__(self) -> None:
        self._conn = pika.BlockingConnection(direct_params())
        self._ch = self._conn.channel()
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def _channel(self):
        if not self._conn.is_open:
            self._conn = pika.BlockingConnection(direct_params())
        if not self._ch.is_open:
            self._ch = self._conn.channel()
        return self._ch

    def declare_queue(self, name: str, durable: bool = True, arguments: dict | None = None) -> str:
        self.queues.append(name)
        self._channel().queue_declare(queue=name, durable=durable, arguments=arguments)
        return name

    def track_queue(self, name: str) -> None:
        """Delete this queue at the end (it is declared by someone else, e.g. Celery)."""
        self.queues.append(name)

    def track_exchange(self, name: str) -> None:
        self.exchanges.append(name)

    def depth(self, name: str) -> int:
        """Messages in a queue (passive declare)."""
        ok = self._channel().queue_declare(queue=name, passive=True)
        return ok.method.message_count

    def settled_depth(self, name: str, settle: float = 0.6, timeout: float = 10.0) -> int:
        """Depth once it stopped changing for ``settle`` seconds (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        last = self.depth(name)
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.depth(name)
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= settle:
                break
        return last

    def cleanup(self) -> None:
        try:
            self._conn.close()
        except Exception:
            pass
        conn = pika.BlockingConnection(direct_params())
        try:
            for q in dict.fromkeys(self.queues):
                ch = conn.channel()
                try:
                    ch.queue_delete(queue=q)
                except pika.exceptions.ChannelClosedByBroker:
                    pass
                finally:
                    if ch.is_open:
                        ch.close()
            for x in dict.fromkeys(self.exchanges):
                ch = conn.channel()
                try:
                    ch.exchange_delete(exchange=x)
                except pika.exceptions.ChannelClosedByBroker:
                    pass
                finally:
                    if ch.is_open:
                        ch.close()
        finally:
            conn.close()


@pytest.fixture
def broker():
    b = Broker()
    try:
        yield b
    finally:
        b.cleanup()


# --------------------------------------------------------------------------------------------
# sluice


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


class Sluice:
    """One running sluice process."""

    def __init__(
        self,
        proc: subprocess.Popen,
        amqp_port: int,
        admin_port: int,
        log: Path,
        config: Path,
        redis_port: int | None = None,
    ):
        self.redis_port = redis_port
        self.proc = proc
        self.amqp_port = amqp_port
        self.admin_port = admin_port
        self.log = log
        self.config = config

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}//"

    def params(self, connection_name: str, **overrides) -> pika.ConnectionParameters:
        """pika parameters for a connection through sluice, named ``connection_name``."""
        kw = dict(
            host="127.0.0.1",
            port=self.amqp_port,
            credentials=GUEST,
            connection_attempts=1,
            socket_timeout=10,
            blocked_connection_timeout=60,
            client_properties={"connection_name": connection_name},
        )
        kw.update(overrides)
        return pika.ConnectionParameters(**kw)

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        status, text = self.http_get("/metrics")
        assert status == 200, f"/metrics answered {status}: {text[:500]}"
        return parse_prometheus(text)

    def messages_by_verdict(self, producer: str) -> dict[str, float]:
        """``sluice_messages_total`` of one producer, summed over listeners, by verdict."""
        out: dict[str, float] = {}
        for name, labels, value in self.metrics():
            if name == "sluice_messages_total" and labels.get("producer") == producer:
                v = labels.get("verdict", "")
                out[v] = out.get(v, 0.0) + value
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, wait, SIGKILL after a timeout. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(f"sluice did not exit within {STOP_TIMEOUT}s of SIGTERM; killed")
        return self.proc.returncode


def sluice_config(
    amqp_port: int,
    admin_port: int,
    body: str,
    redis_port: int | None = None,
    redis_upstream: str | None = None,
) -> str:
    upstream = redis_upstream or f'"{REDIS_HOST}:{REDIS_PORT}"'
    redis = (
        f"""
[[listener]]
name = "redis"
protocol = "redis"
listen = "127.0.0.1:{redis_port}"
upstream = {upstream}
"""
        if redis_port
        else ""
    )
    return f"""\
[admin]
listen = "127.0.0.1:{admin_port}"

[[listener]]
name = "amqp"
protocol = "amqp091"
listen = "127.0.0.1:{amqp_port}"
upstream = "{BROKER_HOST}:{BROKER_PORT}"
{redis}
[identity]
from = ["client_property:connection_name", "user", "peer_ip"]

{body}
"""


def _start(
    tmp_path: Path, body: str, attempt: int, redis: bool = False, redis_upstream: str | None = None
) -> Sluice:
    if not os.access(SLUICE_BIN, os.X_OK):
        pytest.fail(f"sluice binary not found at {SLUICE_BIN} (set SLUICE_BIN or build it first)")
    amqp_port, admin_port = free_port(), free_port()
    while admin_port == amqp_port:
        admin_port = free_port()
    redis_port = None
    if redis:
        redis_port = free_port()
        while redis_port in (amqp_port, admin_port):
            redis_port = free_port()
    config = tmp_path / f"sluice-{attempt}.toml"
    config.write_text(sluice_config(amqp_port, admin_port, body, redis_port, redis_upstream))
    check = subprocess.run(
        [SLUICE_BIN, "check", str(config)], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        pytest.fail(
            f"sluice check rejected the test config:\n{config.read_text()}\n"
            f"stdout:\n{check.stdout}\nstderr:\n{check.stderr}"
        )
    log = tmp_path / f"sluice-{attempt}.stderr.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [SLUICE_BIN, "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            env={**os.environ, "RUST_BACKTRACE": "1", "NO_COLOR": "1"},
        )
    return Sluice(proc, amqp_port, admin_port, log, config, redis_port)


def _ready(s: Sluice) -> bool:
    if not _accepts(s.amqp_port):
        return False
    if s.redis_port and not _accepts(s.redis_port):
        return False
    try:
        status, _ = s.http_get("/healthz")
    except OSError:
        return False
    return status == 200


@pytest.fixture
def sluice(request, tmp_path):
    """Factory: ``sluice(body)`` starts sluice with ``body`` (TOML: [amqp], [[quota]]…) appended to
    an [admin]/[[listener]]/[identity] prelude on free ports, and returns a ready :class:`Sluice`.
    ``sluice(body, redis=True)`` adds a ``redis`` listener in front of 127.0.0.1:6379
    (``s.redis_port``; ``redis_upstream`` replaces its ``upstream`` value, a TOML string or table).
    The ``redis`` listener is the last ``[[listener]]``, so a ``[listener.tls]`` in ``body`` applies
    to it."""
    started: list[Sluice] = []
    ready: list[Sluice] = []
    logs = request.node.stash.setdefault(_logs_key, [])

    def start(body: str, redis: bool = False, redis_upstream: str | None = None) -> Sluice:
        for attempt in range(3):
            s = _start(tmp_path, body, len(started) * 10 + attempt, redis, redis_upstream)
            started.append(s)
            logs.append(str(s.log))
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while time.monotonic() < deadline:
                if not s.alive():
                    break
                if _ready(s):
                    ready.append(s)
                    return s
                time.sleep(0.05)
            if s.alive():
                s.stop()
                pytest.fail(f"sluice did not become ready within {STARTUP_TIMEOUT}s")
            text = s.log_text()
            if "in use" in text.lower():
                continue  # lost a race for a free port: try other ports
            pytest.fail(f"sluice exited with {s.proc.returncode} during startup:\n{text}")
        pytest.fail("sluice could not bind free ports three times")

    yield start

    problems = []
    for s in started:
        if not s.alive():
            if s in ready:
                problems.append(f"sluice exited by itself with {s.proc.returncode} during the test")
            continue  # a startup failure is reported where it happened
        try:
            s.stop()
        except AssertionError as e:
            problems.append(str(e))
    if problems:
        pytest.fail("; ".join(problems))
