#!/usr/bin/env python3
"""The flood drill: replay the broker-flood incident with real Celery, without and with sluice.

One service (``hotfix-svc``) floods ``reports.rebuild`` from several processes while a critical
one (``web-login``) publishes ``auth.login_audit`` at a steady rate with confirms. The broker's
memory high watermark is lowered to emulate a small hosted broker (and always restored). The
same flood runs twice for the same duration: straight at the broker, then through sluice with
``sluice-drill.toml``. Each phase measures the critical publishes (latency, failures, whether
every confirmed one is in the broker), the flood (published, forwarded, diverted, shed, lost),
the broker's memory and its memory alarm.

``--broker redis`` tells the same story on Redis: ``maxmemory`` lowered (``noeviction``, always
restored) in place of the watermark, kombu's Redis transport in place of AMQP (no confirms: a
send succeeded when ``send_task`` returned), ``sluice-drill-redis.toml`` in front, OOM replies in
place of the alarm; results in ``results/drill-redis.*``.

Usage: ``benches/drill/run [options]`` (sets up the venv and binaries), or this file directly.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import backends  # noqa: E402
import broker  # noqa: E402
import producers  # noqa: E402

FLOOD_QUEUE = producers.TASK_QUEUES["reports"]
CRITICAL_QUEUE = producers.TASK_QUEUES["auth"]
OVERFLOW = {q: f"overflow.{q}" for q in producers.TASK_QUEUES.values()}
# Overflow twins page to disk: lazy on 3.x; classic v2 (the default on 4.x, where the mode
# argument is ignored) keeps even the index of small messages out of memory.
OVERFLOW_ARGS = json.loads(os.environ.get("DRILL_OVERFLOW_ARGS", "null")) or {
    "x-queue-mode": "lazy",
    "x-queue-version": 2,
}
FLOOD_PRODUCER = "hotfix-svc"
CRITICAL_PRODUCER = "web-login"


def default_sluice_bin() -> str:
    for cand in (
        os.environ.get("SLUICE_BIN"),
        os.path.join(os.environ.get("CARGO_TARGET_DIR", ""), "release", "sluice")
        if os.environ.get("CARGO_TARGET_DIR")
        else None,
        "/var/tmp/sluice-target/release/sluice",
        str(ROOT / "target" / "release" / "sluice"),
    ):
        if cand and os.access(cand, os.X_OK):
            return cand
    return str(ROOT / "target" / "release" / "sluice")


@dataclass
class DrillConfig:
    baseline: float = 15.0  # seconds of critical traffic alone, after warm-up
    flood: float = 30.0  # seconds of flood
    recovery: float = 10.0  # seconds of critical traffic after the flood stops
    warmup: float = 2.0  # first seconds of critical traffic, not counted
    flood_procs: int = 3
    flood_nice: int = 10  # the flood's processes stand in for other hosts: lower CPU priority
    payload_bytes: int = 2000
    critical_rate: float = 50.0
    critical_timeout: float = 2.0  # a login's budget for its audit publish
    critical_workers: int = 8  # web-login's worker threads, a connection each
    # watermark (RabbitMQ) / maxmemory (Redis) = broker memory at start + this; None: the
    # broker's default (200 MB RabbitMQ, 50 MB Redis)
    headroom_mb: float | None = None
    sluice_bin: str = field(default_factory=default_sluice_bin)
    sluice_config: str = ""  # "": the broker's shipped config
    workdir: str = str(HERE / "results" / "work")
    idle_wait: float = 120.0  # seconds to wait for other clients of the broker to go away
    quiet: bool = False
    broker: str = "rabbitmq"  # or "redis"

    def __post_init__(self):
        d = backends.DEFAULTS[self.broker]
        if self.headroom_mb is None:
            self.headroom_mb = d["headroom_mb"]
        if not self.sluice_config:
            self.sluice_config = str(d["config"])


# --------------------------------------------------------------------------------------------
# Helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(q / 100.0 * len(v)) - 1))
    return v[k]


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str):
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            name, labels, value = m.groups()
            try:
                yield name, dict(_LABEL.findall(labels or "")), float(value)
            except ValueError:
                pass


# --------------------------------------------------------------------------------------------
# sluice


class Sluice:
    """sluice started from the shipped drill config, on free ports."""

    def __init__(self, cfg: DrillConfig, workdir: Path):
        self.bin = cfg.sluice_bin
        if not os.access(self.bin, os.X_OK):
            raise SystemExit(
                f"sluice binary not found at {self.bin}: build it "
                "(cargo build --release -p sluice) or pass --sluice-bin"
            )
        self.amqp_port, self.admin_port = free_port(), free_port()
        while self.admin_port == self.amqp_port:
            self.admin_port = free_port()
        stem = backends.DEFAULTS[cfg.broker]["stem"].replace("drill", "sluice-drill")
        self.config = workdir / f"{stem}.run.toml"
        self.log = workdir / f"{stem.replace('sluice-drill', 'sluice')}.log"
        listeners = tomllib.loads(Path(cfg.sluice_config).read_text()).get("listener", [])
        self.protocol = listeners[0].get("protocol", "amqp091") if listeners else "amqp091"
        render_config(Path(cfg.sluice_config), self.config, self.amqp_port, self.admin_port)
        check = subprocess.run(
            [self.bin, "check", str(self.config)], capture_output=True, text=True, timeout=60
        )
        if check.returncode != 0:
            raise SystemExit(f"sluice check rejected {self.config}:\n{check.stdout}{check.stderr}")
        self._err = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [self.bin, "run", "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._err,
            stderr=self._err,
            env={**os.environ, "NO_COLOR": "1"},
            preexec_fn=_term_with_parent,
        )
        try:
            self._wait_ready()
        except BaseException:  # including a signal turned into SystemExit: never leave it running
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"sluice exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.amqp_port), timeout=0.5):
                    pass
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("sluice did not become ready within 30 s")

    @property
    def url(self) -> str:
        """The first listener's URL (the drill's config has one listener)."""
        if self.protocol == "redis":
            return f"redis://127.0.0.1:{self.amqp_port}/0"
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}//"

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.status, r.read().decode()

    def verdicts(self) -> dict[str, dict[str, float]]:
        """``sluice_messages_total`` by producer and verdict (summed over listeners)."""
        out: dict[str, dict[str, float]] = {}
        try:
            _, text = self.get("/metrics")
        except OSError:
            return out
        for name, labels, value in parse_prometheus(text):
            if name == "sluice_messages_total":
                p = out.setdefault(labels.get("producer", ""), {})
                v = labels.get("verdict", "")
                p[v] = p.get(v, 0.0) + value
            elif name == "sluice_upstream_blocked":
                out.setdefault("_upstream_blocked", {})["max"] = max(
                    out.get("_upstream_blocked", {}).get("max", 0.0), value
                )
        return out

    def plugin_health(self) -> dict:
        """Per policy: errors by kind, whether it is disabled, its plugin counters."""
        out: dict[str, dict] = {}
        try:
            _, text = self.get("/metrics")
        except OSError:
            return out
        for name, labels, v in parse_prometheus(text):
            pol = labels.get("policy")
            if not pol:
                continue
            p = out.setdefault(pol, {"errors": {}, "disabled": False, "counters": {}})
            if name == "sluice_plugin_errors_total" and v:
                p["errors"][labels.get("kind", "")] = int(v)
            elif name == "sluice_plugin_disabled":
                p["disabled"] = p["disabled"] or v > 0
            elif name == "sluice_plugin_events_total":
                p["counters"][labels.get("name", "")] = int(v)
        return out

    def producer_connections(self, producer: str) -> float:
        try:
            _, text = self.get("/metrics")
        except OSError:
            return 0.0
        return sum(
            v
            for name, labels, v in parse_prometheus(text)
            if name == "sluice_producer_connections" and labels.get("producer") == producer
        )

    def metrics_text(self) -> str:
        try:
            return self.get("/metrics")[1]
        except OSError as e:
            return f"(metrics unavailable: {e})"

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._err.close()
        return self.proc.returncode


def _term_with_parent() -> None:
    """In the child, before exec: SIGTERM when the drill dies, even killed outright (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def render_config(src: Path, dst: Path, amqp_port: int, admin_port: int) -> None:
    """The shipped config with its listen addresses on the given ports and plugin paths made
    absolute (they are relative to the shipped file)."""
    text = src.read_text()
    data = tomllib.loads(text)
    admin = data.get("admin", {}).get("listen")
    if admin:
        text = re.sub(
            r'(\[admin\][^\[]*?listen\s*=\s*)"[^"]*"', rf'\g<1>"127.0.0.1:{admin_port}"', text, count=1
        )
    else:
        text = f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n\n' + text
    text = re.sub(
        r'(\[\[listener\]\][^\[]*?\blisten\s*=\s*)"[^"]*"',
        rf'\g<1>"127.0.0.1:{amqp_port}"',
        text,
        count=1,
    )
    for p in data.get("policy", []):
        plugin = p["plugin"]
        text = text.replace(f'"{plugin}"', json.dumps(str((src.parent / plugin).resolve())))
    dst.write_text(text)


# --------------------------------------------------------------------------------------------
# One phase


@dataclass
class PhaseResult:
    name: str  # "direct" | "sluice"
    t0: float
    base_start: float
    flood_start: float
    flood_end: float
    t_end: float
    watermark: int
    memory_start: int
    # web-login logins: (arrival, latency s from arrival, confirmed, error, task id, publish call s)
    critical: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    flood_series: list = field(default_factory=list)  # (t, sent, errors, reconnects)
    memory: list = field(default_factory=list)  # (t, bytes)
    alarm_events: list = field(default_factory=list)  # (t, "set"|"cleared")
    alarm_at_start: bool = False
    verdict_series: list = field(default_factory=list)  # (t, {producer: {verdict: n}})
    policies: dict = field(default_factory=dict)  # sluice's plugin health at the end
    depths: dict = field(default_factory=dict)
    critical_found: dict = field(default_factory=dict)  # queue -> ids found
    summary: dict = field(default_factory=dict)
    broker: str = "rabbitmq"
    # Redis: OOM error replies the server sent during the phase (INFO errorstats), over time
    oom_replies: int | None = None
    oom_series: list = field(default_factory=list)  # (t, cumulative OOM replies)


class Phase:
    def __init__(self, drill: "Drill", name: str, stop_at_alarm: bool = False, flood: float | None = None):
        self.drill = drill
        self.cfg = drill.cfg if flood is None else replace(drill.cfg, flood=flood)
        self.name = name
        self.stop_at_alarm = stop_at_alarm
        self.ctx = mp.get_context("spawn")

    def log(self, msg: str) -> None:
        self.drill.log(f"[{self.name:>6}] {msg}")

    def run(self) -> PhaseResult:
        cfg, d = self.cfg, self.drill
        be, n = d.backend, d.backend.names
        queues = be.queues()
        sl: Sluice | None = None
        flood_procs: list = []
        crit_proc = None
        stop_flood = self.ctx.Event()
        stop_crit = self.ctx.Event()
        out = self.ctx.Queue()
        stride = producers.FLOOD_STRIDE
        counters = self.ctx.RawArray("q", stride * cfg.flood_procs)
        go_flood = self.ctx.Event()
        records: list = []
        notes: list[str] = []
        mem = alarms = None
        crit_ready = threading.Event()
        try:
            queues.declare_all(OVERFLOW_ARGS)
            if self.name == "sluice":
                sl = Sluice(cfg, d.workdir)
                url = sl.url
                self.log(f"sluice on 127.0.0.1:{sl.amqp_port} (admin {sl.admin_port}), config {cfg.sluice_config}")
            else:
                url = be.direct_url()
            alarm_at_start = be.refusing()
            mem_start = be.memory()
            mem, alarms = be.observe(d.watermark)
            t0 = time.time()
            res = PhaseResult(
                self.name, t0, t0, 0.0, 0.0, 0.0, d.watermark, mem_start, alarm_at_start=alarm_at_start,
                broker=be.kind,
            )

            def collect():
                while True:
                    try:
                        item = out.get(timeout=1.0)
                    except Exception:
                        if crit_proc is not None and not crit_proc.is_alive() and out.empty():
                            return
                        continue
                    if item[0] == "publish":
                        records.append(item[1:])
                    elif item[0] == "ready":
                        crit_ready.set()
                    elif item[0] == "error":
                        notes.append(item[1])
                    elif item[0] == "done":
                        return

            crit_proc = self.ctx.Process(
                target=producers.critical_main,
                args=(url, cfg.critical_rate, cfg.critical_timeout, out, stop_crit, cfg.critical_workers),
                name="web-login",
                daemon=True,
            )
            crit_proc.start()
            collector = threading.Thread(target=collect, daemon=True)
            collector.start()
            # The flood's processes start now (imports, connection), then wait for the signal,
            # so that the flood begins at once and their start-up is not in any window.
            for i in range(cfg.flood_procs):
                p = self.ctx.Process(
                    target=producers.flood_main,
                    args=(url, i, counters, go_flood, stop_flood, cfg.payload_bytes, cfg.flood_nice),
                    name=f"hotfix-svc-{i}",
                    daemon=True,
                )
                p.start()
                flood_procs.append(p)
            ready_by = time.time() + 60
            while time.time() < t0 + cfg.warmup or not crit_ready.is_set() or not all(
                counters[stride * i + 3] for i in range(cfg.flood_procs)
            ):
                if time.time() > ready_by or any(not p.is_alive() for p in flood_procs):
                    raise RuntimeError("the web-login or hotfix-svc processes did not connect")
                self._sample(res, counters, sl)
                time.sleep(0.1)
            res.base_start = time.time()
            planned_flood = res.base_start + cfg.baseline
            self.log(
                f"web-login alone for {cfg.baseline:.0f} s, then {cfg.flood_procs} hotfix-svc "
                f"processes flood for {cfg.flood:.0f} s"
            )
            stage = "baseline"
            stopper = None
            next_report = time.time() + 5
            while True:
                now = time.time()
                if stage == "baseline" and now >= planned_flood:
                    go_flood.set()
                    res.flood_start = time.time()
                    stage = "flood"
                elif stage == "flood":
                    alarm_now = any(w == "set" and t >= res.flood_start for t, w in alarms.events)
                    if now >= res.flood_start + cfg.flood or (self.stop_at_alarm and alarm_now):
                        stop_flood.set()
                        res.flood_end = time.time()
                        if self.stop_at_alarm and alarm_now:
                            self.log(f"alarm after {res.flood_end - res.flood_start:.1f} s of flood: stopping it")
                        # Celery closes its connection once what it wrote has gone out: through
                        # sluice that is the paced tail of its socket buffers, so give it time
                        # (killing it would reset the socket and drop the tail). A blocked broker
                        # never lets it finish: that is the incident, it is killed after 10 s.
                        stopper = threading.Thread(
                            target=self._stop_processes,
                            args=(flood_procs, 45.0 if sl is not None else 10.0),
                            daemon=True,
                        )
                        stopper.start()
                        stage = "recovery"
                elif stage == "recovery" and now >= res.flood_end + cfg.recovery:
                    # Through sluice, what Celery already wrote into its sockets is still being
                    # read (paced): wait for the flood's connections to end before counting.
                    # (On Redis the flood's sends are synchronous: nothing is left in its sockets,
                    # and its connections are not counted under its name, which comes per task.)
                    if sl is None or be.kind == "redis" or sl.producer_connections(FLOOD_PRODUCER) == 0:
                        break
                    if now >= res.flood_end + cfg.recovery + 50:
                        notes.append("hotfix-svc connections to sluice still open 50 s after the flood")
                        break
                self._sample(res, counters, sl)
                if now >= next_report and not cfg.quiet:
                    self._progress(res, records, mem, alarms, now)
                    next_report += 5
                if not crit_proc.is_alive():
                    notes.append(f"web-login process exited early ({crit_proc.exitcode})")
                    break
                time.sleep(0.1)
            if stopper is not None:
                stopper.join(timeout=15)

            stop_crit.set()
            crit_proc.join(timeout=cfg.critical_timeout + 10)
            if crit_proc.is_alive():
                crit_proc.terminate()
                crit_proc.join(timeout=5)
            collector.join(timeout=5)
            res.t_end = time.time()
            self._sample(res, counters, sl, force=True)
            if sl is not None:
                prefix = "metrics" if be.kind == "rabbitmq" else f"metrics-{be.kind}"
                (d.workdir / f"{prefix}-{self.name}.txt").write_text(sl.metrics_text())
                res.policies = sl.plugin_health()
                for pol, h in res.policies.items():
                    if h["disabled"]:
                        notes.append(f"sluice disabled policy '{pol}' after errors {h['errors']}")
                rc = sl.stop()
                if rc not in (0, None):
                    notes.append(f"sluice exited with {rc} on SIGTERM")
            mem.stop()
            alarms.stop()
            res.memory = mem.samples
            res.alarm_events = alarms.events
            if be.kind == "redis":
                res.oom_replies = mem.oom_replies
                res.oom_series = [(t, c - mem.oom_start) for t, c in mem.ooms]
            res.critical = sorted(records)
            res.notes = notes
            names = [n.flood, n.overflow[n.flood], n.critical, n.overflow[n.critical]]
            res.depths = queues.settled_depths(names)
            for q in (n.critical, n.overflow[n.critical]):
                res.critical_found[q] = queues.task_ids(q)
            res.summary = summarize(res, cfg)
            return res
        finally:
            go_flood.set()
            stop_flood.set()
            stop_crit.set()
            self._stop_processes(flood_procs)
            if crit_proc is not None and crit_proc.is_alive():
                crit_proc.terminate()
            if sl is not None and sl.proc.poll() is None:
                sl.stop()
            for obs in (mem, alarms):
                if obs is not None:
                    try:
                        obs.stop()
                    except Exception:
                        pass
            try:
                queues.delete_all()
            finally:
                queues.close()

    def _sample(self, res, counters, sl, force: bool = False) -> None:
        now = time.time()
        n, w = self.cfg.flood_procs, producers.FLOOD_STRIDE
        if force or not res.flood_series or now - res.flood_series[-1][0] >= 0.5:
            # (t, sent, errors, reconnects, OOM errors, shed errors)
            res.flood_series.append(
                (now, *[sum(counters[w * i + k] for i in range(n)) for k in (0, 1, 2, 4, 5)])
            )
        if sl is not None and (force or not res.verdict_series or now - res.verdict_series[-1][0] >= 1.0):
            v = sl.verdicts()
            res.verdict_series.append((time.time(), v))

    @staticmethod
    def _stop_processes(procs, grace: float = 5.0) -> None:
        deadline = time.monotonic() + grace
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()  # stuck in a write to a blocked broker
        for p in procs:
            p.join(timeout=5)

    def _progress(self, res, records, mem, alarms, now) -> None:
        recent = [r[1] for r in records[-int(self.cfg.critical_rate * 5) :] if r[0] >= now - 5]
        fails = sum(1 for r in records if r[0] >= now - 5 and not r[2])
        fs = res.flood_series
        rate = 0.0
        if len(fs) >= 2:
            (ta, a, *_), (tb, b, *_) = fs[max(0, len(fs) - 11)], fs[-1]
            rate = (b - a) / max(tb - ta, 1e-6)
        m = mem.samples[-1][1] / 1e6 if mem.samples else 0
        on = alarms.events and alarms.events[-1][1] == "set"
        p99 = percentile(recent, 99)
        flag = " ALARM" if res.broker == "rabbitmq" else " OOM: writes refused"
        self.log(
            f"t={now - res.t0:5.1f}s flood {rate:6.0f}/s | web-login p99(5s) "
            f"{'-' if p99 is None else f'{p99 * 1e3:.1f} ms'} failed {fails} | broker "
            f"{m:.0f}/{res.watermark / 1e6:.0f} MB{flag if on else ''}"
        )


# --------------------------------------------------------------------------------------------
# Summaries


def window_stats(records, start: float, end: float, budget: float) -> dict:
    """Logins that arrived in [start, end): latency percentiles (from arrival; failures count
    with the time they took) and failures (not confirmed within the budget)."""
    sel = [r for r in records if start <= r[0] < end]
    lat = [r[1] * 1e3 for r in sel]
    return {
        "publishes": len(sel),
        "failed": sum(1 for r in sel if not r[2] or r[1] > budget),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None,
    }


def summarize(res: PhaseResult, cfg: DrillConfig) -> dict:
    n = backends.names(res.broker)
    counted = res.base_start
    crit = res.critical
    budget = cfg.critical_timeout
    base = window_stats(crit, counted, res.flood_start, budget)
    during = window_stats(crit, res.flood_start, res.flood_end, budget)
    after = window_stats(crit, res.flood_end, res.t_end + 1, budget)
    overall = window_stats(crit, counted, res.t_end + 1, budget)
    errors: dict[str, int] = {}
    for r in crit:
        if r[0] >= counted and (not r[2] or r[1] > budget):
            why = r[3] or "over budget"
            errors[why] = errors.get(why, 0) + 1
    confirmed = {r[4] for r in crit if r[2]}
    attempted = {r[4] for r in crit}
    found = set()
    for ids in res.critical_found.values():
        found.update(ids)
    _, sent, flood_errors, reconnects, *rest = res.flood_series[-1] if res.flood_series else (0, 0, 0, 0)
    flood_oom = rest[0] if rest else 0
    flood_shed_errors = rest[1] if len(rest) > 1 else 0
    # Sends that raised, by what they ran into (web-login): a login that waited past its budget
    # for a free worker ("late") never tried.
    send_errors = {k: v for k, v in errors.items() if k not in ("late", "over budget")}
    flood_rates = []
    fs = res.flood_series
    for (ta, a, *_), (tb, b, *_) in zip(fs, fs[2:]):
        if res.flood_start <= ta and tb <= res.flood_end + 0.5:
            flood_rates.append((b - a) / max(tb - ta, 1e-6))
    verdicts = res.verdict_series[-1][1] if res.verdict_series else {}
    hv = verdicts.get(FLOOD_PRODUCER, {})
    cv = verdicts.get(CRITICAL_PRODUCER, {})
    depth_q = res.depths.get(n.flood) or 0
    depth_o = res.depths.get(n.overflow[n.flood]) or 0
    shed = int(hv.get("shed", 0))
    in_broker = depth_q + depth_o
    # AMQP without confirms: a shed publish is dropped and counted, Celery believes it sent it.
    # Redis: a shed push gets an error reply, so send_task raised (or Celery retried it).
    shed_sent = shed if res.broker == "rabbitmq" else 0
    spans = broker.alarm_spans(res.alarm_events, res.t0, res.t_end, res.alarm_at_start)
    first_alarm = next((a for a, _ in spans if a >= res.flood_start), None)
    before_flood = any(a < res.flood_start for a, _ in spans)
    mem_peak = max((b for _, b in res.memory), default=res.memory_start)
    flood_secs = max(res.flood_end - res.flood_start, 1e-6)
    return {
        "phase": res.name,
        "flood_seconds": round(flood_secs, 1),
        "critical": {
            "rate": cfg.critical_rate,
            "attempted": len(crit),
            "confirmed": len(confirmed),
            "failed": overall["failed"],
            "errors": errors,
            "budget_s": budget,
            "baseline": base,
            "flood": during,
            "recovery": after,
            "overall": overall,
            "p99_ratio": (during["p99_ms"] / base["p99_ms"])
            if during["p99_ms"] and base["p99_ms"]
            else None,
            "in_broker": len(found & attempted),
            "confirmed_in_broker": len(confirmed & found),
            "lost": len(confirmed - found),
            "unconfirmed_but_landed": len((attempted - confirmed) & found),
            "send_errors": sum(send_errors.values()),
            "oom_errors": errors.get("OOM", 0),
        },
        "flood": {
            "processes": cfg.flood_procs,
            "sent": int(sent),
            "rate_mean": sent / flood_secs,
            "rate_peak": max(flood_rates, default=0.0),
            "errors": int(flood_errors),
            "oom_errors": int(flood_oom),
            "shed_errors": int(flood_shed_errors),
            "reconnects": int(reconnects),
            "forwarded": int(hv.get("forward", 0) + hv.get("delay", 0)) if verdicts else None,
            "held_then_forwarded": int(hv.get("delay", 0)) if verdicts else None,
            "diverted": int(hv.get("divert", 0)) if verdicts else None,
            "shed": shed if verdicts else None,
            "in_task_queue": depth_q,
            "in_overflow": depth_o,
            "in_broker": in_broker,
            "lost": max(0, int(sent) - in_broker - shed_sent),
            "duplicates": max(0, in_broker - int(sent)),
        },
        "critical_verdicts": cv,
        "policies": res.policies,
        "broker": {
            "kind": res.broker,
            "oom_replies": res.oom_replies,
            "watermark_mb": res.watermark / 1e6,
            "memory_start_mb": res.memory_start / 1e6,
            "memory_peak_mb": mem_peak / 1e6,
            "alarm_seconds": round(sum(b - a for a, b in spans), 1),
            "alarm_first_after_flood_s": None if first_alarm is None else round(first_alarm - res.flood_start, 1),
            "alarm_set_at_start": res.alarm_at_start,
            "alarm_before_flood": before_flood,
            "alarm_events": len(res.alarm_events),
        },
        "depths": res.depths,
        "notes": res.notes,
    }


# --------------------------------------------------------------------------------------------
# The drill


class Drill:
    """Both phases under one lowered limit (RabbitMQ's watermark, Redis's maxmemory). Use as a
    context manager: the limit is lowered on entry and restored on exit, whatever happens."""

    def __init__(self, cfg: DrillConfig, log=None):
        self.cfg = cfg
        self.log = log or (lambda m: print(m, flush=True))
        self.workdir = Path(cfg.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backend = backends.backend(cfg.broker, self.log)
        self.results: dict[str, PhaseResult] = {}

    def __enter__(self) -> "Drill":
        # Stale state of an interrupted drill, other clients (the drill measures the broker: wait
        # a while for them to finish), leftovers, then a clean memory baseline.
        self.memory_base = self.backend.open(self.cfg.idle_wait)
        self.watermark = int(self.memory_base + self.cfg.headroom_mb * 1e6)
        self.backend.lower(self.watermark)
        return self

    def __exit__(self, *exc) -> None:
        self.backend.restore()

    def run_phase(self, name: str, stop_at_alarm: bool = False, flood: float | None = None) -> PhaseResult:
        """One phase; ``flood`` overrides the flood's duration (with ``stop_at_alarm``: at most)."""
        if self.results:
            # Start from the same broker state as the first phase: memory back near where it was
            # (garbage collected), the alarm (if the last phase tripped it) cleared.
            be = self.backend
            limit = self.memory_base + 0.25 * self.cfg.headroom_mb * 1e6
            deadline = time.monotonic() + 90
            m = be.settle()
            while (m > limit or be.refusing()) and time.monotonic() < deadline:
                time.sleep(5)
                m = be.settle()
            self.log(f"broker memory back to {m / 1e6:.0f} MB before the {name} phase")
            if m > limit:
                self.log(f"!! still above {limit / 1e6:.0f} MB: the {name} phase starts on a fuller broker")
        res = Phase(self, name, stop_at_alarm, flood).run()
        self.results[name] = res
        s = res.summary
        self.log(
            f"done: web-login p99 {fmt_ms(s['critical']['baseline']['p99_ms'])} alone, "
            f"{fmt_ms(s['critical']['flood']['p99_ms'])} under flood, {s['critical']['failed']} failed, "
            f"{s['critical']['lost']} lost; {'alarm' if res.broker == 'rabbitmq' else 'OOM'} "
            f"{s['broker']['alarm_seconds']} s; flood sent {s['flood']['sent']}, lost {s['flood']['lost']}"
        )
        return res


# --------------------------------------------------------------------------------------------
# Output


def fmt_ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} ms" if v >= 100 else f"{v:.1f} ms"


def fmt_n(v) -> str:
    return "-" if v is None else f"{v:,}"


def table(results: dict[str, PhaseResult]) -> str:
    if next(iter(results.values())).broker == "redis":
        return table_redis(results)
    order = [n for n in ("direct", "sluice") if n in results]
    heads = {"direct": "direct to the broker", "sluice": "through sluice"}
    S = {n: results[n].summary for n in order}

    def row(label, f):
        return "| " + label + " | " + " | ".join(f(S[n]) for n in order) + " |"

    def lat(w):
        return lambda s: (
            f"{fmt_ms(s['critical'][w]['p50_ms'])} / {fmt_ms(s['critical'][w]['p99_ms'])} / "
            f"{fmt_ms(s['critical'][w]['max_ms'])}"
        )

    def alarm_cell(s):
        b = s["broker"]
        if not b["alarm_events"] and not b["alarm_set_at_start"]:
            return "never"
        when = []
        if b["alarm_before_flood"]:
            when.append("set BEFORE the flood: something else filled the broker")
        if b["alarm_first_after_flood_s"] is not None:
            when.append(f"after {b['alarm_first_after_flood_s']} s of flood")
        return f"{b['alarm_seconds']} s ({'; '.join(when)})"

    def verdict(key):
        return lambda s: fmt_n(s["flood"][key]) if s["flood"][key] is not None else "-"

    lines = [
        "| | " + " | ".join(heads[n] for n in order) + " |",
        "|---|" + "---|" * len(order),
        row("**web-login** logins (audit publish with confirm)", lambda s: f"{s['critical']['overall']['publishes']:,}"),
        row(f"failed (not confirmed within {results[order[0]].summary['critical']['budget_s']:g} s)", lambda s: f"{s['critical']['failed']:,}"),
        row("latency p50 / p99 / max, alone (baseline)", lat("baseline")),
        row("latency p50 / p99 / max, during the flood", lat("flood")),
        row("p99 during flood ÷ baseline", lambda s: "-" if s["critical"]["p99_ratio"] is None else f"{s['critical']['p99_ratio']:.2f}×"),
        row("lost (confirmed, not in the broker)", lambda s: f"{s['critical']['lost']}"),
        row("**hotfix-svc** tasks published (Celery)", lambda s: f"{s['flood']['sent']:,} ({s['flood']['rate_mean']:,.0f}/s)"),
        row("→ forwarded to the task queue", verdict("forwarded")),
        row("→ diverted to the overflow queue", verdict("diverted")),
        row("→ shed", verdict("shed")),
        row("lost (published, not in the broker, not shed)", lambda s: f"{s['flood']['lost']:,}"),
        row("Celery reconnects", lambda s: f"{s['flood']['reconnects']}"),
        row("sluice policy errors", lambda s: "-" if not s["policies"] else ", ".join(
            f"{p}: {sum(h['errors'].values())}{' (DISABLED)' if h['disabled'] else ''}"
            for p, h in s["policies"].items())),
        row("**broker** memory alarm (publishers blocked)", alarm_cell),
        row("memory start → peak (watermark)", lambda s: f"{s['broker']['memory_start_mb']:.0f} → {s['broker']['memory_peak_mb']:.0f} MB ({s['broker']['watermark_mb']:.0f} MB)"),
        row(f"queue depths at the end: {FLOOD_QUEUE} / overflow", lambda s: f"{fmt_n(s['depths'].get(FLOOD_QUEUE))} / {fmt_n(s['depths'].get(OVERFLOW[FLOOD_QUEUE]))}"),
        row(f"{CRITICAL_QUEUE}", lambda s: f"{fmt_n(s['critical']['in_broker'])}"),
    ]
    return "\n".join(lines)


def _errors_cell(errors: dict) -> str:
    if not errors:
        return ""
    return " (" + ", ".join(f"{k} {v:,}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1])) + ")"


def table_redis(results: dict[str, PhaseResult]) -> str:
    """The Redis mode's table: the same story, in Redis's terms."""
    order = [n for n in ("direct", "sluice") if n in results]
    heads = {"direct": "direct to Redis", "sluice": "through sluice"}
    S = {n: results[n].summary for n in order}
    n = backends.names("redis")
    budget = S[order[0]]["critical"]["budget_s"]

    def row(label, f):
        return "| " + label + " | " + " | ".join(f(S[k]) for k in order) + " |"

    def lat(w):
        return lambda s: (
            f"{fmt_ms(s['critical'][w]['p50_ms'])} / {fmt_ms(s['critical'][w]['p99_ms'])} / "
            f"{fmt_ms(s['critical'][w]['max_ms'])}"
        )

    def verdict(key):
        return lambda s: fmt_n(s["flood"][key]) if s["flood"][key] is not None else "-"

    def oom_cell(s):
        b = s["broker"]
        replies = b.get("oom_replies")
        if not b["alarm_events"] and not b["alarm_set_at_start"] and not replies:
            return "never"
        when = []
        if b["alarm_before_flood"]:
            when.append("BEFORE the flood: something else filled Redis")
        if b["alarm_first_after_flood_s"] is not None:
            when.append(f"from {b['alarm_first_after_flood_s']} s into the flood")
        return f"{b['alarm_seconds']} s{' (' + '; '.join(when) + ')' if when else ''}, {fmt_n(replies)} OOM replies"

    def flood_errors(s):
        f = s["flood"]
        if not f["errors"]:
            return "0"
        kinds = [f"OOM {f['oom_errors']:,}", f"shed {f.get('shed_errors', 0):,}"]
        other = f["errors"] - f["oom_errors"] - f.get("shed_errors", 0)
        if other:
            kinds.append(f"other {other:,}")
        return f"{f['errors']:,} ({', '.join(kinds)})"

    lines = [
        "| | " + " | ".join(heads[k] for k in order) + " |",
        "|---|" + "---|" * len(order),
        row("**web-login** logins (`send_task`, no confirms on Redis)", lambda s: f"{s['critical']['overall']['publishes']:,}"),
        row(f"failed (send not OK within {budget:g} s)", lambda s: f"{s['critical']['failed']:,}{_errors_cell(s['critical']['errors'])}"),
        row("latency p50 / p99 / max, alone (baseline)", lat("baseline")),
        row("latency p50 / p99 / max, during the flood", lat("flood")),
        row("p99 during flood ÷ baseline", lambda s: "-" if s["critical"]["p99_ratio"] is None else f"{s['critical']['p99_ratio']:.2f}×"),
        row("lost (sent OK, not in Redis)", lambda s: f"{s['critical']['lost']}"),
        row("**hotfix-svc** tasks sent (`send_task` returned)", lambda s: f"{s['flood']['sent']:,} ({s['flood']['rate_mean']:,.0f}/s)"),
        row("→ forwarded to the task list", verdict("forwarded")),
        row("→ diverted to the overflow list", verdict("diverted")),
        row("→ pushes shed by sluice (`-SLUICE shed`)", verdict("shed")),
        row("`send_task` errors (after Celery's retries)", flood_errors),
        row("lost (sent, not in Redis)", lambda s: f"{s['flood']['lost']:,}"),
        row("Celery reconnects", lambda s: f"{s['flood']['reconnects']:,}"),
        row("sluice policy errors", lambda s: "-" if not s["policies"] else ", ".join(
            f"{p}: {sum(h['errors'].values())}{' (DISABLED)' if h['disabled'] else ''}"
            for p, h in s["policies"].items())),
        row("**Redis** refusing writes (OOM)", oom_cell),
        row("used_memory start → peak (maxmemory)", lambda s: f"{s['broker']['memory_start_mb']:.1f} → {s['broker']['memory_peak_mb']:.1f} MB ({s['broker']['watermark_mb']:.1f} MB)"),
        row(f"list lengths at the end: {n.flood} / overflow", lambda s: f"{fmt_n(s['depths'].get(n.flood))} / {fmt_n(s['depths'].get(n.overflow[n.flood]))}"),
        row(f"{n.critical}", lambda s: f"{fmt_n(s['critical']['in_broker'])}"),
    ]
    return "\n".join(lines)


def machine_note() -> str:
    try:
        load = os.getloadavg()
        load_s = f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    except OSError:
        load_s = "load unknown"
    return f"{os.cpu_count()} cores, {load_s}, {platform.node()}"


def result_stem(broker_kind: str) -> str:
    """``drill`` (RabbitMQ) or ``drill-redis``: results/<stem>.md/.json/.png, work/series*.json."""
    return backends.DEFAULTS[broker_kind]["stem"]


def series_file(cfg: DrillConfig) -> Path:
    return Path(cfg.workdir) / ("series.json" if cfg.broker == "rabbitmq" else f"series-{cfg.broker}.json")


def write_results(results: dict[str, PhaseResult], cfg: DrillConfig, outdir: Path, extra: dict) -> dict:
    outdir.mkdir(parents=True, exist_ok=True)
    tbl = table(results)
    limit_mb = next(iter(results.values())).watermark / 1e6
    when = extra.get("when") or time.strftime("%Y-%m-%d %H:%M %Z")
    if cfg.broker == "redis":
        header = (
            f"Flood drill on Redis, {when}: {cfg.flood_procs} hotfix-svc processes ({cfg.payload_bytes} B "
            f"tasks) for {cfg.flood:.0f} s after {cfg.baseline:.0f} s of web-login alone "
            f"({cfg.critical_rate:.0f}/s, {cfg.critical_timeout:g} s budget); maxmemory {limit_mb:.1f} MB "
            f"(noeviction); {extra.get('load', '')}."
        )
    else:
        header = (
            f"Flood drill, {when}: {cfg.flood_procs} hotfix-svc processes "
            f"({cfg.payload_bytes} B tasks) for {cfg.flood:.0f} s after {cfg.baseline:.0f} s of web-login "
            f"alone ({cfg.critical_rate:.0f}/s, confirms, {cfg.critical_timeout:.0f} s budget); watermark "
            f"{limit_mb:.0f} MB; {extra.get('load', '')}."
        )
    stem = result_stem(cfg.broker)
    (outdir / f"{stem}.md").write_text(header + "\n\n" + tbl + "\n")
    raw = {
        "config": asdict(cfg),
        "extra": extra,
        "phases": {n: {"summary": r.summary} for n, r in results.items()},
    }
    (outdir / f"{stem}.json").write_text(json.dumps(raw, indent=2, default=str))
    series = {n: asdict(r) for n, r in results.items()}
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    series_file(cfg).write_text(json.dumps(series, default=str))
    return {"header": header, "table": tbl}


def chart(results: dict[str, PhaseResult], cfg: DrillConfig, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [n for n in ("direct", "sluice") if n in results]
    redis_mode = cfg.broker == "redis"
    titles = {"direct": "direct to Redis" if redis_mode else "direct to the broker", "sluice": "through sluice"}
    words = (
        {"queue": "list", "ok": "web-login login, audit sent (Redis answered)",
         "bad": "failed: OOM error or not sent within", "lat": "login → sent, ms",
         "mem": "Redis used_memory", "limit": "lowered maxmemory",
         "refused": "OOM: Redis refuses writes", "sent": "sent by hotfix-svc (Celery)"}
        if redis_mode else
        {"queue": "queue", "ok": "web-login login, audit confirmed",
         "bad": "failed: not confirmed within", "lat": "login → confirm, ms",
         "mem": "broker memory (RSS)", "limit": "lowered watermark",
         "refused": "memory alarm: publishers blocked", "sent": "published by hotfix-svc (Celery)"}
    )
    fig, axes = plt.subplots(3, len(order), figsize=(6.2 * len(order), 8.4), sharex="col", squeeze=False)
    lat_max = max(
        (r[1] * 1e3 for res in results.values() for r in res.critical), default=10.0
    )
    for col, name in enumerate(order):
        res = results[name]
        t = lambda x: x - res.flood_start  # noqa: E731
        spans = broker.alarm_spans(res.alarm_events, res.t0, res.t_end, res.alarm_at_start)
        ax_f, ax_l, ax_m = axes[0][col], axes[1][col], axes[2][col]
        for ax in (ax_f, ax_l, ax_m):
            ax.axvspan(0, t(res.flood_end), color="#f4d9a8", alpha=0.35, lw=0)
            for a, b in spans:
                ax.axvspan(t(a), t(b), color="#d62728", alpha=0.15, lw=0)
            ax.grid(alpha=0.3)
        # Flood rate
        fs = res.flood_series
        xs, ys = [], []
        for (ta, a, *_), (tb, b, *_) in zip(fs, fs[2:]):
            xs.append(t((ta + tb) / 2))
            ys.append((b - a) / max(tb - ta, 1e-6))
        ax_f.plot(xs, ys, color="#ff7f0e", lw=1.5, label=words["sent"])
        if redis_mode and any(c for _, c in res.oom_series):
            os_ = res.oom_series
            xs = [t((ta + tb) / 2) for (ta, _), (tb, _) in zip(os_, os_[4:])]
            ys = [(b - a) / max(tb - ta, 1e-6) for (ta, a), (tb, b) in zip(os_, os_[4:])]
            ax_f.plot(xs, ys, color="#d62728", lw=1.0, ls="--", label="OOM error replies from Redis")
        vs = res.verdict_series
        if len(vs) >= 2:
            for key, color, label in (
                (("forward", "delay"), "#1f77b4", f"→ task {words['queue']}"),
                (("divert",), "#9467bd", f"→ overflow {words['queue']}"),
                (("shed",), "#d62728", "shed"),
            ):
                xs, ys = [], []
                for (ta, a), (tb, b) in zip(vs, vs[1:]):
                    ga = sum(a.get(FLOOD_PRODUCER, {}).get(k, 0) for k in key)
                    gb = sum(b.get(FLOOD_PRODUCER, {}).get(k, 0) for k in key)
                    if tb > ta:
                        xs.append(t((ta + tb) / 2))
                        ys.append((gb - ga) / (tb - ta))
                if any(ys) or key == ("forward", "delay"):
                    ax_f.plot(xs, ys, color=color, lw=1.2, label=label)
        ax_f.set_title(titles[name], fontsize=11, fontweight="bold")
        ax_f.set_ylabel("flood, tasks/s")
        ax_f.legend(fontsize=7, loc="upper left")
        ax_f.set_ylim(bottom=0)
        # Critical latency
        budget = cfg.critical_timeout
        ok = [(t(r[0]), r[1] * 1e3) for r in res.critical if r[2] and r[1] <= budget]
        bad = [(t(r[0]), r[1] * 1e3) for r in res.critical if not (r[2] and r[1] <= budget)]
        if ok:
            ax_l.scatter(*zip(*ok), s=3, color="#2ca02c", label=words["ok"])
        if bad:
            ax_l.scatter(*zip(*bad), s=10, marker="x", color="#d62728", lw=0.8,
                         label=f"{words['bad']} {budget:g} s")
        base = res.summary["critical"]["baseline"]["p99_ms"]
        if base:
            ax_l.axhline(base, color="#555", ls="--", lw=0.8, label=f"baseline p99 {fmt_ms(base)}")
            ax_l.axhline(1.5 * base, color="#555", ls=":", lw=0.8, label="1.5 × baseline p99")
        ax_l.set_yscale("log")
        ax_l.set_ylim(max(0.1, min((v for _, v in ok), default=1) / 2), max(lat_max * 1.5, 10))
        ax_l.set_ylabel(words["lat"])
        ax_l.legend(fontsize=7, loc="upper left")
        # Broker memory
        if res.memory:
            ax_m.plot([t(a) for a, _ in res.memory], [b / 1e6 for _, b in res.memory], color="#1f77b4", lw=1.4, label=words["mem"])
        ax_m.axhline(res.watermark / 1e6, color="#d62728", ls="--", lw=1, label=words["limit"])
        if spans:
            ax_m.plot([], [], color="#d62728", alpha=0.3, lw=6, label=words["refused"])
        ax_m.set_ylabel("MB")
        ax_m.set_xlabel("seconds since the flood started")
        ax_m.set_ylim(bottom=0)
        ax_m.legend(fontsize=7, loc="lower left")
    if redis_mode:
        title = (
            f"Flood drill on Redis: {cfg.flood_procs} Celery processes flood reports.rebuild for "
            f"{cfg.flood:.0f} s (shaded);\nweb-login sends {cfg.critical_rate:.0f} login audits/s; "
            "red: Redis at maxmemory, refusing writes (OOM)"
        )
    else:
        title = (
            f"Flood drill: {cfg.flood_procs} Celery processes flood reports.rebuild for {cfg.flood:.0f} s "
            f"(shaded);\nweb-login publishes {cfg.critical_rate:.0f} login audits/s with confirms; "
            "red: broker memory alarm"
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# CLI


def replot(outdir: Path, broker_kind: str = "rabbitmq") -> int:
    """Table and chart again from a run's raw series (results/work/series*.json)."""
    stem = result_stem(broker_kind)
    raw = json.loads((outdir / f"{stem}.json").read_text())
    cfg = DrillConfig(**{k: v for k, v in raw["config"].items() if k in DrillConfig.__dataclass_fields__})
    series = json.loads(series_file(cfg).read_text())
    results = {}
    for name, data in series.items():
        data.pop("summary", None)
        res = PhaseResult(**{k: v for k, v in data.items() if k in PhaseResult.__dataclass_fields__})
        res.critical = [tuple(r) for r in res.critical]
        res.summary = summarize(res, cfg)
        results[name] = res
    out = write_results(results, cfg, outdir, raw.get("extra", {}))
    print(out["header"] + "\n\n" + out["table"])
    print(f"chart: {chart(results, cfg, outdir / f'{stem}.png')}")
    return 0


def restore_all(log=print) -> bool:
    """Put back whatever an interrupted drill left lowered: RabbitMQ's watermark, Redis's
    maxmemory (each only if its state file says so). Returns whether anything was restored."""
    import redis_broker

    restored = False
    for name, fn in (("RabbitMQ", broker.restore_stale_state), ("Redis", redis_broker.restore_stale_state)):
        try:
            restored = fn(log) is not None or restored
        except (broker.BrokerError, redis_broker.BrokerError) as e:
            log(f"!! {name}: {e}")
            raise SystemExit(1) from e
    # The Redis mode's lists hold memory in a Redis other tools share: drop what a killed drill
    # left (no drill is running: restore_stale_state would have refused). Skipped without Redis.
    try:
        lists = redis_broker.Lists(backends.names("redis").all)
        try:
            n = lists.delete()
        finally:
            lists.close()
        if n:
            log(f"deleted {n} list(s) an earlier Redis drill left")
            restored = True
    except redis_broker.redis.exceptions.ConnectionError:
        pass
    return restored


def main(argv=None) -> int:
    d = DrillConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--broker", choices=("rabbitmq", "redis"), default="rabbitmq",
                    help="replay the incident on RabbitMQ (default; its memory watermark lowered) or on "
                         "Redis (its maxmemory lowered, noeviction)")
    ap.add_argument("--phases", default="sluice,direct", help="which phases, in order (default: sluice,direct)")
    ap.add_argument("--baseline", type=float, default=d.baseline, help="seconds of web-login alone before the flood")
    ap.add_argument("--flood", type=float, default=d.flood, help="seconds of flood per phase")
    ap.add_argument("--recovery", type=float, default=d.recovery, help="seconds of web-login after the flood")
    ap.add_argument("--flood-procs", type=int, default=d.flood_procs)
    ap.add_argument("--payload-bytes", type=int, default=d.payload_bytes)
    ap.add_argument("--critical-rate", type=float, default=d.critical_rate)
    ap.add_argument("--critical-timeout", type=float, default=d.critical_timeout)
    ap.add_argument("--critical-workers", type=int, default=d.critical_workers)
    ap.add_argument("--headroom-mb", type=float, default=None,
                    help="watermark (RabbitMQ) or maxmemory (Redis) = the broker's memory at the start + this "
                         "(default: 200 on RabbitMQ, 50 on Redis)")
    ap.add_argument("--sluice-bin", default=d.sluice_bin)
    ap.add_argument("--config", default=None,
                    help="the sluice config under test (default: sluice-drill.toml, or sluice-drill-redis.toml with --broker redis)")
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--no-chart", action="store_true")
    ap.add_argument("--restore", action="store_true",
                    help="only put back what an interrupted drill left lowered (RabbitMQ's watermark, Redis's maxmemory)")
    ap.add_argument("--replot", action="store_true", help="redo the table and chart of the last run in --results (of --broker)")
    a = ap.parse_args(argv)
    if a.replot:
        return replot(Path(a.results), a.broker)
    if a.restore:
        print("restored" if restore_all() else "nothing to restore")
        return 0
    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    if not phases or any(p not in ("direct", "sluice") for p in phases):
        ap.error("--phases takes direct and/or sluice")
    cfg = DrillConfig(
        baseline=a.baseline, flood=a.flood, recovery=a.recovery, flood_procs=a.flood_procs,
        payload_bytes=a.payload_bytes, critical_rate=a.critical_rate,
        critical_timeout=a.critical_timeout, critical_workers=a.critical_workers, headroom_mb=a.headroom_mb, sluice_bin=a.sluice_bin,
        sluice_config=str(Path(a.config).resolve()) if a.config else "", workdir=str(Path(a.results) / "work"),
        broker=a.broker,
    )
    load_before = machine_note()
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    with Drill(cfg) as drill:
        for p in phases:
            drill.run_phase(p)
    out = write_results(drill.results, cfg, Path(a.results), {"load": load_before, "load_after": machine_note(), "when": when})
    print()
    print(out["header"])
    print()
    print(out["table"])
    stem = result_stem(cfg.broker)
    if not a.no_chart:
        png = chart(drill.results, cfg, Path(a.results) / f"{stem}.png")
        print(f"\nchart: {png}")
    print(f"results: {Path(a.results) / f'{stem}.md'}, raw: {Path(a.results) / f'{stem}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
