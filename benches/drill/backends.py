"""The two brokers the drill can run against, behind one interface.

* ``rabbitmq``: the node's memory high watermark is lowered; past it the broker's memory alarm
  blocks every publisher (``broker.py``).
* ``redis``: ``maxmemory`` is lowered with ``noeviction``; past it every write is refused with
  ``-OOM command not allowed when used memory > 'maxmemory'`` (``redis_broker.py``).

``Phase`` and ``Drill`` (drill.py) only talk to a backend: its queue names, its direct URL, the
limit it lowers (and always restores), its memory sampler and "writes refused" watcher (RabbitMQ's
alarm; Redis's OOM), and its queues (depths, the task ids in them, deleting them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import producers

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Names:
    """The drill's queues on one broker."""

    reports: str
    auth: str

    @property
    def flood(self) -> str:
        return self.reports

    @property
    def critical(self) -> str:
        return self.auth

    @property
    def overflow(self) -> dict[str, str]:
        return {q: f"overflow.{q}" for q in (self.reports, self.auth)}

    @property
    def all(self) -> list[str]:
        return [self.reports, self.auth, *self.overflow.values()]


NAMES = {
    "rabbitmq": Names(**producers.TASK_QUEUES),
    "redis": Names(**producers.REDIS_TASK_QUEUES),
}

# Per broker: the shipped sluice config, the default headroom above the broker's memory at the
# start, where results go, and the words the table and chart use.
DEFAULTS = {
    "rabbitmq": {
        "config": HERE / "sluice-drill.toml",
        "headroom_mb": 200.0,
        "stem": "drill",
    },
    "redis": {
        "config": HERE / "sluice-drill-redis.toml",
        "headroom_mb": 50.0,
        "stem": "drill-redis",
    },
}


def names(kind: str) -> Names:
    return NAMES[kind]


class RabbitBackend:
    kind = "rabbitmq"
    limit_name = "watermark"
    # Without confirms, a publish sluice sheds is dropped and counted: Celery thinks it sent it.
    shed_counts_as_sent = True

    def __init__(self, log):
        import broker

        self.b = broker
        self.log = log
        self.names = names(self.kind)
        self._wm = None

    # ---- set-up and tear-down
    def open(self, idle_wait: float) -> int:
        """Checks and leftovers before a drill; returns the broker's settled memory."""
        b = self.b
        b.restore_stale_state(self.log)
        self.node_pid = b.node_pid()
        self.log_file = b.node_log_file()
        deadline = time.monotonic() + idle_wait
        others = [c for c in b.client_connections() if not c.startswith("sluice-drill")]
        if others and idle_wait > 0:
            self.log(f"waiting up to {idle_wait:.0f} s for {len(others)} other client connection(s) to end")
        while others and time.monotonic() < deadline:
            time.sleep(5)
            others = [c for c in b.client_connections() if not c.startswith("sluice-drill")]
        if others:
            self.log(
                f"note: {len(others)} other client connection(s) on the broker "
                f"({', '.join(sorted(set(others))[:5])}): the direct phase's memory alarm blocks "
                "their publishes too while it lasts"
            )
        if "memory" in b.active_alarms():
            raise SystemExit("the broker's memory alarm is already set: not starting a drill")
        q = self.queues()
        try:
            q.delete_all()
        finally:
            q.close()
        base = b.settle_memory(self.node_pid, log=self.log)
        self.log(
            f"broker pid {self.node_pid}, memory {base / 1e6:.0f} MB; "
            f"alarms from {self.log_file or 'polling'}"
        )
        return base

    def lower(self, limit: int) -> None:
        self._wm = self.b.LoweredWatermark(limit, log=self.log)
        self._wm.__enter__()

    def restore(self) -> None:
        if self._wm is not None:
            self._wm.restore()

    def settle(self) -> int:
        return self.b.settle_memory(self.node_pid, log=self.log)

    # ---- during a phase
    def direct_url(self) -> str:
        return f"amqp://guest:guest@{self.b.BROKER_HOST}:{self.b.BROKER_PORT}//"

    def refusing(self) -> bool:
        return "memory" in self.b.active_alarms()

    def memory(self) -> int:
        return self.b.rss_bytes(self.node_pid)

    def observe(self, limit: int):
        """Start observing: returns (memory sampler, refusal watcher), each with ``stop()``;
        the sampler has ``samples`` [(t, bytes)], the watcher ``events`` [(t, set|cleared)]."""
        return self.b.MemorySampler(self.node_pid).start(), self.b.AlarmWatcher(self.log_file).start()

    def queues(self) -> "RabbitQueues":
        return RabbitQueues(self.b, self.names)


class RabbitQueues:
    def __init__(self, b, n: Names):
        self.n = n
        self.q = b.Queues()
        self.overflow_args = None

    def declare_all(self, overflow_args: dict) -> None:
        for q in (self.n.reports, self.n.auth):
            self.q.declare(q)
        for q in self.n.overflow.values():
            self.q.declare(q, overflow_args)

    def settled_depths(self, names: list[str]) -> dict:
        return self.q.settled_depths(names)

    def task_ids(self, queue: str) -> list[str]:
        return self.q.drain_task_ids(queue)

    def delete_all(self) -> None:
        self.q.delete(self.n.all, [self.n.reports, self.n.auth])

    def close(self) -> None:
        self.q.close()


class RedisBackend:
    kind = "redis"
    limit_name = "maxmemory"
    # A push sluice sheds gets an error reply: send_task raises (or Celery retries it).
    shed_counts_as_sent = False

    def __init__(self, log):
        import redis_broker

        self.b = redis_broker
        self.log = log
        self.names = names(self.kind)
        self._mm = None
        self._r = None

    def _conn(self):
        if self._r is None:
            self._r = self.b.client()
        return self._r

    def open(self, idle_wait: float) -> int:
        b, r = self.b, self._conn()
        b.restore_stale_state(self.log)
        mm, policy = b.read_limits(r)
        deadline = time.monotonic() + idle_wait
        others = b.other_clients(r)
        if others and idle_wait > 0:
            self.log(f"waiting up to {idle_wait:.0f} s for {len(others)} other Redis client(s) to end")
        while others and time.monotonic() < deadline:
            time.sleep(5)
            others = b.other_clients(r)
        if others:
            self.log(
                f"note: {len(others)} other client(s) on Redis ({', '.join(sorted(set(others))[:5])}): "
                "their writes are refused too while the direct phase has Redis full"
            )
        if mm and b.used_memory(r) > mm:
            raise SystemExit("Redis is already above its maxmemory: not starting a drill")
        q = self.queues()
        try:
            n = q.delete_all()
        finally:
            q.close()
        if n:
            self.log(f"deleted {n} list(s) an earlier drill left in Redis")
        base = b.settle_memory(r)
        self.log(
            f"Redis {b.REDIS_HOST}:{b.REDIS_PORT}, used_memory {base / 1e6:.1f} MB "
            f"({b.describe_limits(mm, policy)})"
        )
        return base

    def lower(self, limit: int) -> None:
        self._mm = self.b.LoweredMaxmemory(limit, log=self.log)
        self._mm.__enter__()
        self.limit = limit

    def restore(self) -> None:
        if self._mm is not None:
            self._mm.restore()
        if self._r is not None:
            self._r.close()
            self._r = None

    def settle(self) -> int:
        return self.b.settle_memory(self._conn())

    def direct_url(self) -> str:
        return f"redis://{self.b.REDIS_HOST}:{self.b.REDIS_PORT}/0"

    def refusing(self) -> bool:
        return self.b.is_full(self._conn())

    def memory(self) -> int:
        return self.b.used_memory(self._conn())

    def observe(self, limit: int):
        s = self.b.Sampler(limit).start()
        return s, s  # one thread samples memory and watches for OOM replies

    def queues(self) -> "RedisQueues":
        return RedisQueues(self.b, self.names)


class RedisQueues:
    def __init__(self, b, n: Names):
        self.n = n
        self.q = b.Lists(n.all)

    def declare_all(self, overflow_args: dict) -> None:
        pass  # lists exist once something is pushed

    def settled_depths(self, names: list[str]) -> dict:
        return self.q.settled_depths(names)

    def task_ids(self, queue: str) -> list[str]:
        return self.q.task_ids(queue)

    def delete_all(self) -> int:
        return self.q.delete()

    def close(self) -> None:
        self.q.close()


def backend(kind: str, log):
    if kind == "rabbitmq":
        return RabbitBackend(log)
    if kind == "redis":
        return RedisBackend(log)
    raise ValueError(f"unknown broker {kind!r} (rabbitmq or redis)")
