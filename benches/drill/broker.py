"""The broker side of the drill: RabbitMQ's memory watermark, memory and alarm observation, and
the drill's queues.

Everything here talks to the local node: ``rabbitmqctl`` (run as root or as the rabbitmq user)
for the watermark, the node's OS process for its resident memory (RabbitMQ's default ``rss``
strategy measures exactly that), the node's log file for alarm set/clear events, and AMQP on
127.0.0.1:5672 for queues.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pika
import pika.exceptions

BROKER_HOST = os.environ.get("DRILL_BROKER_HOST", "127.0.0.1")
BROKER_PORT = int(os.environ.get("DRILL_BROKER_PORT", "5672"))
RABBITMQCTL = os.environ.get("RABBITMQCTL", "rabbitmqctl")

# Where the watermark the drill found is kept while the drill runs. If a run dies without
# restoring it (SIGKILL, power loss), the next run, or `run --restore`, restores from here.
STATE_FILE = Path(os.environ.get("DRILL_STATE_FILE", "/var/tmp/sluice-drill-watermark.json"))


class BrokerError(RuntimeError):
    pass


def ctl(*args: str, timeout: float = 60.0) -> str:
    """Run ``rabbitmqctl -q ARGS`` and return its stdout."""
    try:
        p = subprocess.run(
            [RABBITMQCTL, "-q", *args], capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError as e:
        raise BrokerError(f"{RABBITMQCTL} not found: the drill needs the local RabbitMQ's CLI") from e
    if p.returncode != 0:
        raise BrokerError(
            f"rabbitmqctl {' '.join(args)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}"
            " (run the drill as root or as the rabbitmq user)"
        )
    return p.stdout.strip()


def erl_eval(expr: str) -> str:
    return ctl("eval", expr)


# --------------------------------------------------------------------------------------------
# Watermark


def read_watermark() -> tuple[str, float]:
    """The node's memory high watermark as ``("relative", 0.4)`` or ``("absolute", bytes)``."""
    out = erl_eval("vm_memory_monitor:get_vm_memory_high_watermark().")
    m = re.fullmatch(r"\{(absolute|relative),\s*([0-9.eE+-]+)\}", out)
    if m:
        return m.group(1), float(m.group(2))
    try:
        return "relative", float(out)
    except ValueError:
        raise BrokerError(f"cannot read the memory high watermark from {out!r}") from None


def memory_limit_bytes() -> int:
    return int(erl_eval("vm_memory_monitor:get_memory_limit()."))


def set_watermark(kind: str, value: float) -> None:
    if kind == "absolute":
        ctl("set_vm_memory_high_watermark", "absolute", str(int(value)))
    else:
        ctl("set_vm_memory_high_watermark", repr(float(value)))


def describe_watermark(kind: str, value: float) -> str:
    return f"absolute {value / 1e6:.0f} MB" if kind == "absolute" else f"{value} of available memory"


class LoweredWatermark:
    """Context manager: lowers the node's memory high watermark to ``limit_bytes`` and always
    puts the original back: on exit, on SIGTERM/SIGHUP/SIGINT (turned into exceptions while the
    context is active), at interpreter exit, and, should the process be killed outright, at the
    start of the next drill from the state file."""

    def __init__(self, limit_bytes: int, log=print):
        self.limit_bytes = int(limit_bytes)
        self.log = log
        self.original: tuple[str, float] | None = None
        self._old_handlers: dict[int, object] = {}
        self._restored = False

    def __enter__(self) -> "LoweredWatermark":
        self.original = restore_stale_state(self.log) or read_watermark()
        STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
        STATE_FILE.write_text(
            json.dumps({"kind": self.original[0], "value": self.original[1], "pid": os.getpid()})
        )
        self._install_handlers()
        try:
            set_watermark("absolute", self.limit_bytes)
        except BaseException:
            self.restore()
            raise
        self.log(
            f"broker watermark lowered to {self.limit_bytes / 1e6:.0f} MB "
            f"(was {describe_watermark(*self.original)}; restored at the end)"
        )
        return self

    def restore(self) -> None:
        if self._restored or self.original is None:
            return
        kind, value = self.original
        last: Exception | None = None
        for attempt in range(5):
            try:
                set_watermark(kind, value)
                break
            except Exception as e:  # the CLI can time out on a loaded node: try again
                last = e
                time.sleep(1 + attempt)
        else:
            self.log(f"!! could not restore the watermark ({last}); state kept in {STATE_FILE}")
            self._uninstall_handlers()
            raise BrokerError(f"watermark not restored: {last}")
        self._restored = True
        STATE_FILE.unlink(missing_ok=True)
        self._uninstall_handlers()
        self.log(f"broker watermark restored to {describe_watermark(kind, value)}")

    def __exit__(self, *exc) -> None:
        self.restore()

    # Signals become exceptions so that `finally` blocks (and this context's exit) run.
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def raise_exit(signum, _frame):
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, raise_exit)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            self._old_handlers[signal.SIGINT] = signal.signal(
                signal.SIGINT, signal.default_int_handler
            )
        import atexit

        atexit.register(self.restore)

    def _uninstall_handlers(self) -> None:
        for sig, h in self._old_handlers.items():
            try:
                signal.signal(sig, h)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()


def restore_stale_state(log=print) -> tuple[str, float] | None:
    """If an earlier drill died with the watermark lowered, restore it; returns the original."""
    if not STATE_FILE.exists():
        return None
    try:
        st = json.loads(STATE_FILE.read_text())
        original = (st["kind"], float(st["value"]))
    except (ValueError, KeyError) as e:
        log(f"ignoring unreadable {STATE_FILE}: {e}")
        STATE_FILE.unlink(missing_ok=True)
        return None
    pid = st.get("pid")
    if pid and pid != os.getpid() and _pid_alive(pid):
        raise BrokerError(
            f"another drill (pid {pid}) holds the broker watermark ({STATE_FILE}); "
            "the drill changes broker-wide state and must run alone"
        )
    log(f"an earlier drill left the watermark lowered: restoring {describe_watermark(*original)}")
    set_watermark(*original)
    STATE_FILE.unlink(missing_ok=True)
    return original


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return b"python" in cmdline.read_bytes()
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Node facts


def node_pid() -> int:
    return int(erl_eval("os:getpid().").strip('"'))


def node_log_file() -> Path | None:
    try:
        out = ctl("eval", "rabbit:log_locations().")
    except BrokerError:
        out = ""
    for path in re.findall(r'"([^"]+\.log)"', out):
        p = Path(path)
        if p.is_file() and "upgrade" not in p.name:
            return p
    for p in sorted(Path("/var/log/rabbitmq").glob("rabbit@*.log")):
        if "upgrade" not in p.name:
            return p
    return None


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def active_alarms() -> str:
    return erl_eval("rabbit_alarm:get_alarms().")


def force_gc() -> None:
    ctl("force_gc")


def client_connections() -> list[str]:
    """Names (or peers) of the broker's client connections right now."""
    try:
        out = ctl("list_connections", "peer_host", "peer_port", "client_properties", timeout=20)
    except BrokerError:
        return []
    rows = []
    for line in out.splitlines():
        if not line.strip() or line.startswith("peer_host"):
            continue
        m = re.search(r'\{"connection_name",longstr,"([^"]*)"\}', line) or re.search(
            r'connection_name",longstr,<<"([^"]*)">>', line
        )
        rows.append(m.group(1) if m else " ".join(line.split()[:2]))
    return rows


def settle_memory(pid: int, timeout: float = 25.0, log=print) -> int:
    """Full-sweep GC on the node, then wait until its RSS stops falling; returns it."""
    try:
        force_gc()
    except BrokerError as e:
        log(f"force_gc failed: {e}")
    deadline = time.monotonic() + timeout
    last = rss_bytes(pid)
    stable = 0
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = rss_bytes(pid)
        if abs(now - last) < 2e6:
            stable += 1
            if stable >= 3:
                return now
        else:
            stable = 0
        last = now
    return last


# --------------------------------------------------------------------------------------------
# Observers


@dataclass
class MemorySampler:
    """Samples the node's RSS every ``interval`` seconds in a thread."""

    pid: int
    interval: float = 0.25
    samples: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill-memory", daemon=True)

    def start(self) -> "MemorySampler":
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), rss_bytes(self.pid)))
            except OSError:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


_ALARM = re.compile(r"memory resource limit alarm (set|cleared)")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d:?\d\d|Z)?)")


class AlarmWatcher:
    """Follows the node's log for memory alarm set/clear lines, from now on.

    Falls back to asking the node (``rabbit_alarm:get_alarms()``) every two seconds when the
    node writes no log file."""

    def __init__(self, log_file: Path | None, poll: float = 0.2):
        self.log_file = log_file
        self.poll = poll
        self.events: list[tuple[float, str]] = []  # (unix time, "set" | "cleared")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill-alarms", daemon=True)
        self._offset = log_file.stat().st_size if log_file else 0

    def start(self) -> "AlarmWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        time.sleep(self.poll * 2)
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self):
        if self.log_file is None:
            return self._run_polling()
        buf = ""
        while True:
            stopping = self._stop.is_set()
            try:
                with open(self.log_file, "r", errors="replace") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size < self._offset:  # rotated
                        self._offset = 0
                    f.seek(self._offset)
                    chunk = f.read()
                    self._offset = f.tell()
            except OSError:
                chunk = ""
            buf += chunk
            *lines, buf = buf.split("\n")
            for line in lines:
                m = _ALARM.search(line)
                if m:
                    self.events.append((_line_time(line), m.group(1)))
            if stopping:
                return
            self._stop.wait(self.poll)

    def _run_polling(self):
        was = False
        while not self._stop.is_set():
            try:
                now = "memory" in active_alarms()
            except BrokerError:
                now = was
            if now != was:
                self.events.append((time.time(), "set" if now else "cleared"))
                was = now
            self._stop.wait(2.0)


def _line_time(line: str) -> float:
    m = _STAMP.match(line)
    if m:
        try:
            return datetime.fromisoformat(m.group(1).replace(" ", "T")).timestamp()
        except ValueError:
            pass
    return time.time()


def alarm_spans(events: list[tuple[float, str]], start: float, end: float, set_before: bool = False):
    """[(from, to)] intervals in [start, end] during which the memory alarm was set."""
    spans = []
    on = start if set_before else None
    for t, what in sorted(events):
        if what == "set" and on is None:
            on = max(t, start)
        elif what == "cleared" and on is not None:
            spans.append((on, min(max(t, start), end)))
            on = None
    if on is not None:
        spans.append((on, end))
    return [(a, b) for a, b in spans if b >= a]


# --------------------------------------------------------------------------------------------
# Queues


def params(name: str = "sluice-drill-admin") -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        host=BROKER_HOST,
        port=BROKER_PORT,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=3,
        retry_delay=1,
        socket_timeout=10,
        blocked_connection_timeout=60,
        client_properties={"connection_name": name},
    )


class Queues:
    """The drill's queues and exchanges on the broker, through a direct connection."""

    def __init__(self):
        self._conn = pika.BlockingConnection(params())
        self._ch = self._conn.channel()

    def _channel(self):
        if not self._conn.is_open:
            self._conn = pika.BlockingConnection(params())
        if not self._ch.is_open:
            self._ch = self._conn.channel()
        return self._ch

    def declare(self, name: str, arguments: dict | None = None) -> None:
        self._channel().queue_declare(queue=name, durable=True, arguments=arguments)

    def depth(self, name: str) -> int | None:
        try:
            return self._channel().queue_declare(queue=name, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            return None

    def settled_depths(self, names: list[str], settle: float = 1.5, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        last = {n: self.depth(n) for n in names}
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = {n: self.depth(n) for n in names}
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= settle:
                break
        return last

    def drain_task_ids(self, name: str, limit: int = 200_000) -> list[str]:
        """Celery task ids (the ``id`` header) of every message in a queue. Consumes them: the
        drill deletes its queues after counting anyway."""
        ch = self._conn.channel()
        ids: list[str] = []
        try:
            for method, props, _body in ch.consume(name, auto_ack=True, inactivity_timeout=1.0):
                if method is None:
                    break
                tid = (props.headers or {}).get("id")
                if tid is not None:
                    ids.append(tid.decode() if isinstance(tid, bytes) else str(tid))
                if len(ids) >= limit:
                    break
        except pika.exceptions.ChannelClosedByBroker:
            return ids
        finally:
            if ch.is_open:
                ch.close()
        return ids

    def delete(self, queues: list[str], exchanges: list[str] = ()) -> None:
        for q in queues:
            try:
                self._channel().queue_delete(queue=q)
            except pika.exceptions.ChannelClosedByBroker:
                pass
        for x in exchanges:
            try:
                self._channel().exchange_delete(exchange=x)
            except pika.exceptions.ChannelClosedByBroker:
                pass

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:
            pass
