"""The broker side of the drill's Redis mode: Redis's ``maxmemory`` (lowered, always restored),
memory and OOM observation, and the drill's keys.

Everything here talks to the local Redis (127.0.0.1:6379) directly, never through sluice. The
Redis is shared with other tests and tools: the drill never flushes anything; it deletes only its
own lists (``sluice-drill.*``, ``overflow.sluice-drill.*``) and its queues' members of kombu's
``_kombu.binding.*`` sets.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

REDIS_HOST = os.environ.get("DRILL_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("DRILL_REDIS_PORT", "6379"))

# Where the maxmemory settings the drill found are kept while it runs. If a run dies without
# restoring them (SIGKILL, power loss), the next run, or `run --restore`, restores from here.
STATE_FILE = Path(os.environ.get("DRILL_REDIS_STATE_FILE", "/var/tmp/sluice-drill-redis-maxmemory.json"))

# kombu's separator between a queue's name and its priority (`queue\x06\x163`), and in the
# members of `_kombu.binding.<exchange>` sets (`routing_key SEP pattern SEP queue`).
KOMBU_SEP = b"\x06\x16"
KOMBU_PRIORITIES = (3, 6, 9)
ADMIN_NAME = "sluice-drill-admin"


class BrokerError(RuntimeError):
    pass


def client(name: str = ADMIN_NAME) -> redis.Redis:
    return redis.Redis(
        host=REDIS_HOST, port=REDIS_PORT, socket_timeout=10, socket_connect_timeout=5, client_name=name
    )


def _call(fn, what: str):
    try:
        return fn()
    except redis.exceptions.RedisError as e:
        raise BrokerError(f"Redis at {REDIS_HOST}:{REDIS_PORT}: {what} failed: {e}") from e


# --------------------------------------------------------------------------------------------
# maxmemory


def read_limits(r: redis.Redis) -> tuple[int, str]:
    """``(maxmemory bytes, maxmemory-policy)`` as the server has them now."""
    mm = _call(lambda: r.config_get("maxmemory"), "CONFIG GET maxmemory")
    pol = _call(lambda: r.config_get("maxmemory-policy"), "CONFIG GET maxmemory-policy")
    return int(mm["maxmemory"]), str(pol["maxmemory-policy"])


def set_limits(r: redis.Redis, maxmemory: int, policy: str) -> None:
    # Policy first when lowering: never a moment with a low maxmemory and an evicting policy
    # (that would evict other users' keys).
    _call(lambda: r.config_set("maxmemory-policy", policy), "CONFIG SET maxmemory-policy")
    _call(lambda: r.config_set("maxmemory", str(int(maxmemory))), "CONFIG SET maxmemory")


def describe_limits(maxmemory: int, policy: str) -> str:
    mm = "0 (no limit)" if not maxmemory else f"{maxmemory / 1e6:.0f} MB"
    return f"maxmemory {mm}, maxmemory-policy {policy}"


class LoweredMaxmemory:
    """Context manager: sets Redis's ``maxmemory`` to ``limit_bytes`` with policy ``noeviction``
    (writes fail with ``-OOM command not allowed when used memory > 'maxmemory'``, nothing is
    evicted) and always puts both original values back: on exit, on SIGTERM/SIGHUP/SIGINT
    (turned into exceptions while the context is active), at interpreter exit, and, should the
    process be killed outright, at the start of the next drill from the state file."""

    def __init__(self, limit_bytes: int, log=print):
        self.limit_bytes = int(limit_bytes)
        self.log = log
        self.original: tuple[int, str] | None = None
        self._old_handlers: dict[int, object] = {}
        self._restored = False

    def __enter__(self) -> "LoweredMaxmemory":
        r = client()
        try:
            self.original = restore_stale_state(self.log) or read_limits(r)
            STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
            STATE_FILE.write_text(
                json.dumps(
                    {"maxmemory": self.original[0], "policy": self.original[1], "pid": os.getpid(),
                     "redis": f"{REDIS_HOST}:{REDIS_PORT}"}
                )
            )
            self._install_handlers()
            try:
                set_limits(r, self.limit_bytes, "noeviction")
            except BaseException:
                self.restore()
                raise
        finally:
            r.close()
        self.log(
            f"Redis maxmemory lowered to {self.limit_bytes / 1e6:.0f} MB, noeviction "
            f"(was {describe_limits(*self.original)}; restored at the end)"
        )
        return self

    def restore(self) -> None:
        if self._restored or self.original is None:
            return
        mm, policy = self.original
        last: Exception | None = None
        for attempt in range(5):
            r = client()
            try:
                set_limits(r, mm, policy)
                break
            except Exception as e:  # a busy or restarting server: try again
                last = e
                time.sleep(1 + attempt)
            finally:
                r.close()
        else:
            self.log(f"!! could not restore Redis's maxmemory ({last}); state kept in {STATE_FILE}")
            self._uninstall_handlers()
            raise BrokerError(f"maxmemory not restored: {last}")
        self._restored = True
        STATE_FILE.unlink(missing_ok=True)
        self._uninstall_handlers()
        self.log(f"Redis restored to {describe_limits(mm, policy)}")

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
            self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        import atexit

        atexit.register(self.restore)

    def _uninstall_handlers(self) -> None:
        for sig, h in self._old_handlers.items():
            try:
                signal.signal(sig, h)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()


def restore_stale_state(log=print) -> tuple[int, str] | None:
    """If an earlier drill died with maxmemory lowered, restore it; returns the original."""
    if not STATE_FILE.exists():
        return None
    try:
        st = json.loads(STATE_FILE.read_text())
        original = (int(st["maxmemory"]), str(st["policy"]))
    except (ValueError, KeyError, TypeError) as e:
        log(f"ignoring unreadable {STATE_FILE}: {e}")
        STATE_FILE.unlink(missing_ok=True)
        return None
    pid = st.get("pid")
    if pid and pid != os.getpid() and _pid_alive(pid):
        raise BrokerError(
            f"another drill (pid {pid}) holds Redis's maxmemory ({STATE_FILE}); "
            "the drill changes server-wide state and must run alone"
        )
    log(f"an earlier drill left Redis's maxmemory lowered: restoring {describe_limits(*original)}")
    r = client()
    try:
        set_limits(r, *original)
    finally:
        r.close()
    STATE_FILE.unlink(missing_ok=True)
    return original


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return b"python" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Server facts


def used_memory(r: redis.Redis) -> int:
    return int(_call(lambda: r.info("memory"), "INFO memory")["used_memory"])


def oom_count(r: redis.Redis) -> int:
    """OOM error replies the server has sent since its start or its last CONFIG RESETSTAT
    (``INFO errorstats``, Redis 6.2+; 0 where it is missing)."""
    stats = _call(lambda: r.info("errorstats"), "INFO errorstats")
    v = stats.get("errorstat_OOM")
    if isinstance(v, dict):
        return int(v.get("count", 0))
    return 0


def is_full(r: redis.Redis) -> bool:
    """Whether writes are refused right now (used memory above a set maxmemory)."""
    mm, _ = read_limits(r)
    return bool(mm) and used_memory(r) > mm


def other_clients(r: redis.Redis) -> list[str]:
    """Other clients of the server right now (name, else address), not the drill's own."""
    try:
        me = r.client_id()
        rows = r.client_list()
    except redis.exceptions.RedisError:
        return []
    out = []
    for c in rows:
        if int(c.get("id", -1)) == me or str(c.get("name", "")).startswith("sluice-drill"):
            continue
        out.append(c.get("name") or c.get("addr", "?"))
    return out


def settle_memory(r: redis.Redis, timeout: float = 15.0) -> int:
    """Wait until used_memory stops moving (a deleted big list is freed at once, but the drill's
    own connections close asynchronously); returns it."""
    deadline = time.monotonic() + timeout
    last = used_memory(r)
    stable = 0
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = used_memory(r)
        if abs(now - last) < 256 * 1024:
            stable += 1
            if stable >= 3:
                return now
        else:
            stable = 0
        last = now
    return last


# --------------------------------------------------------------------------------------------
# Observer


@dataclass
class Sampler:
    """Samples used_memory and the OOM error count every ``interval`` seconds in a thread, on its
    own connection. ``events`` follows RabbitMQ's alarm: ("set", t) when Redis starts refusing
    writes (the OOM count rose, or used memory is above maxmemory), ("cleared", t) when it
    stops (used memory back under maxmemory, no new OOM reply)."""

    maxmemory: int
    interval: float = 0.25
    samples: list[tuple[float, int]] = field(default_factory=list)  # (t, used_memory)
    ooms: list[tuple[float, int]] = field(default_factory=list)  # (t, errorstat_OOM)
    events: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill-redis-memory", daemon=True)
        self._r = client("sluice-drill-sampler")
        self.oom_start = oom_count(self._r)
        self.full_at_start = used_memory(self._r) > self.maxmemory > 0

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def _run(self):
        full = self.full_at_start
        last_oom = self.oom_start
        while not self._stop.is_set():
            try:
                t = time.time()
                used = used_memory(self._r)
                ooms = oom_count(self._r)
            except BrokerError:
                self._stop.wait(self.interval)
                continue
            self.samples.append((t, used))
            self.ooms.append((t, ooms))
            refusing = ooms > last_oom or (self.maxmemory > 0 and used > self.maxmemory)
            if refusing != full:
                self.events.append((t, "set" if refusing else "cleared"))
                full = refusing
            last_oom = ooms
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._r.close()
        except Exception:
            pass

    @property
    def oom_replies(self) -> int:
        return (self.ooms[-1][1] - self.oom_start) if self.ooms else 0


# --------------------------------------------------------------------------------------------
# The drill's lists


def _keys_of(queue: str) -> list[str]:
    """A kombu queue's lists: the queue itself and its priority variants."""
    return [queue] + [f"{queue}{KOMBU_SEP.decode()}{p}" for p in KOMBU_PRIORITIES]


class Lists:
    """The drill's queues (Redis lists) and kombu's bindings for them, on a direct connection."""

    def __init__(self, queues: list[str]):
        self.queues = list(queues)
        self._r = client()

    def depth(self, queue: str) -> int:
        p = self._r.pipeline(transaction=False)
        for k in _keys_of(queue):
            p.llen(k)
        return sum(int(n) for n in p.execute())

    def settled_depths(self, names: list[str], settle: float = 1.0, timeout: float = 10.0) -> dict:
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

    def task_ids(self, queue: str, chunk: int = 2000) -> list[str]:
        """Celery task ids (``headers.id`` of the kombu envelope) of every message in a queue,
        without consuming them."""
        ids: list[str] = []
        for key in _keys_of(queue):
            n = self._r.llen(key)
            for start in range(0, n, chunk):
                for raw in self._r.lrange(key, start, start + chunk - 1):
                    try:
                        tid = json.loads(raw).get("headers", {}).get("id")
                    except (ValueError, AttributeError):
                        continue
                    if tid is not None:
                        ids.append(str(tid))
        return ids

    def delete(self) -> int:
        """Delete the drill's lists and its queues' members of kombu's binding sets. Returns the
        number of keys deleted. Never touches anything else."""
        keys = [k for q in self.queues for k in _keys_of(q)]
        n = int(self._r.delete(*keys)) if keys else 0
        mine = {q.encode() for q in self.queues}
        for bkey in self._r.scan_iter(match="_kombu.binding.*", count=500):
            try:
                members = self._r.smembers(bkey)
            except redis.exceptions.ResponseError:  # not a set: not kombu's
                continue
            drop = [m for m in members if m.split(KOMBU_SEP)[-1] in mine]
            if drop:
                self._r.srem(bkey, *drop)  # an emptied set disappears with its last member
        return n

    def close(self) -> None:
        try:
            self._r.close()
        except Exception:
            pass
