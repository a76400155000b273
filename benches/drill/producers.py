"""The drill's two Celery producers, each run in its own process.

* ``hotfix-svc`` (the bad deploy): several processes call ``send_task("reports.rebuild")`` as
  fast as Celery goes, with a ~2 KB argument, Celery's defaults otherwise (no publisher
  confirms, publish retries on).
* ``web-login`` (the critical path): logins arrive at a steady rate and are served by a pool of
  worker threads (a connection each), each calling ``send_task("auth.login_audit")`` with
  ``confirm_publish``; every login is timed from its arrival. A login not confirmed within its
  budget failed.

Both name themselves with the ``connection_name`` client property, which is how sluice tells
producers apart. Neither knows whether it talks to the broker or to sluice: only the URL differs.

With a ``redis://`` URL (the drill's Redis mode) the same code runs on kombu's Redis transport:
there are no publisher confirms (a send succeeded when ``send_task`` returned: Redis answered the
LPUSH), and since kombu's Redis transport has no option to name its connections (no ``CLIENT
SETNAME``), each producer names itself in a task header instead (``producer``, added by a
``before_task_publish`` handler), which sluice reads per message (``header:producer``).
"""

from __future__ import annotations

import os
import sys
import time
import uuid

TASK_QUEUES = {"reports": "drill.reports", "auth": "drill.auth"}
# On Redis the queues are lists in a server other tools share: names only the drill uses.
REDIS_TASK_QUEUES = {"reports": "sluice-drill.reports", "auth": "sluice-drill.auth"}
FLOOD_TASK = "reports.rebuild"
CRITICAL_TASK = "auth.login_audit"
# The task header a producer names itself with on Redis (sluice: `header:producer`).
PRODUCER_HEADER = "producer"
# Shared counters per flood process: sent, errors (send_task raised), reconnects, ready, errors
# that were Redis's OOM reply, errors that were a sluice shed (Redis: `-SLUICE shed: ...`).
FLOOD_STRIDE = 6


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


def task_queues(url: str) -> dict[str, str]:
    return REDIS_TASK_QUEUES if is_redis(url) else TASK_QUEUES


def error_kind(e: BaseException) -> str:
    """What a failed send ran into: Redis's OOM reply, a sluice shed, else the exception type.

    kombu re-raises redis-py's errors as its own (``OperationalError``), keeping the original as
    the cause; redis-py turns ``-OOM command not allowed ...`` into ``OutOfMemoryError`` with the
    code stripped from the message."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 5:
        text = str(cur)
        if type(cur).__name__ == "OutOfMemoryError" or "command not allowed when used memory" in text:
            return "OOM"
        if "SLUICE shed" in text:
            return "shed"
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return type(e).__name__


def orphaned(parent: int) -> bool:
    """Whether the drill that started this process is gone (killed outright: no one will set
    ``stop``). The producers then stop by themselves instead of writing into the broker forever."""
    return os.getppid() != parent


def celery_app(url: str, producer: str, confirm: bool, timeout: float = 10.0):
    from celery import Celery
    from kombu import Queue

    queues = task_queues(url)
    app = Celery(f"drill-{producer}", set_as_current=False)
    if is_redis(url):
        # No confirms on Redis. socket_timeout bounds a send stuck on a dead connection
        # (sluice's pacing holds a push for at most a few seconds).
        options = {"socket_timeout": max(10.0, 3 * timeout), "socket_connect_timeout": timeout}
        _name_tasks(producer)
    else:
        options = {"client_properties": {"connection_name": producer}}
        if confirm:
            options["confirm_publish"] = True
    app.conf.update(
        broker_url=url,
        broker_transport_options=options,
        broker_connection_timeout=timeout,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(q, routing_key=q) for q in queues.values()],
        task_routes={"reports.*": {"queue": queues["reports"]},
                     "auth.*": {"queue": queues["auth"]}},
        task_default_queue=queues["reports"],
        result_backend=None,
        task_ignore_result=True,
    )
    return app


def _name_tasks(producer: str) -> None:
    """Every task this process sends carries ``producer: <name>`` in its headers."""
    from celery import signals

    def name(headers=None, **_):
        if headers is not None:
            headers.setdefault(PRODUCER_HEADER, producer)

    signals.before_task_publish.connect(name, weak=False)


def flood_main(url: str, index: int, counters, go, stop, payload_bytes: int, nice: int) -> None:
    """One hotfix-svc process: connects, says it is ready, waits for ``go``, then floods until
    ``stop``. ``counters`` is a shared array with [sent, errors, reconnects, ready, OOM errors,
    shed errors] per process, at ``FLOOD_STRIDE * index``."""
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    app = celery_app(url, "hotfix-svc", confirm=False)
    payload = "r" * payload_bytes
    base = FLOOD_STRIDE * index
    conn = app.connection_for_write()
    conn.ensure_connection(max_retries=3)
    producer = app.amqp.Producer(conn)
    last_transport = getattr(conn, "_connection", None)
    counters[base + 3] = 1
    parent = os.getppid()
    while not go.wait(1.0):
        if orphaned(parent):
            return
    n = 0
    seen: set[str] = set()
    while not stop.is_set() and not orphaned(parent):
        try:
            app.send_task(FLOOD_TASK, args=[n, payload], producer=producer)
            n += 1
            counters[base] += 1
        except Exception as e:
            counters[base + 1] += 1
            kind = error_kind(e)
            if kind not in seen:  # the first of each kind, for the drill's log
                seen.add(kind)
                print(f"hotfix-svc-{index}: send_task failed ({kind}): {e!r:.300}", file=sys.stderr, flush=True)
            if kind == "OOM":
                counters[base + 4] += 1
            elif kind == "shed":
                counters[base + 5] += 1
            time.sleep(0.05)
        # kombu replaces the underlying connection when it reconnects (e.g. after py-amqp's
        # TCP_USER_TIMEOUT aborted a stalled socket); whatever was in the old one is gone.
        transport = getattr(conn, "_connection", None)
        if transport is not None and transport is not last_transport:
            if last_transport is not None:
                counters[base + 2] += 1
            last_transport = transport
    try:
        conn.release()
    except Exception:
        pass


def critical_main(url: str, rate: float, budget: float, out, stop, workers: int = 8) -> None:
    """web-login: a login every ``1/rate`` seconds, each publishing one task with confirms (on
    Redis: without, the send succeeded when Redis answered), served by ``workers`` threads with a
    connection each (a web server's worker pool).

    Latency is measured from the moment the login arrived, not from when a worker got to it, so
    a stuck broker also counts against the logins waiting for a free worker. A login whose
    audit is not confirmed within ``budget`` seconds of its arrival failed: the publish timed
    out or errored, or it waited that long for a worker and was never attempted. After a failed
    publish a worker reconnects. Results go to ``out`` as ("publish", arrival, latency s,
    confirmed, error, task id, publish call s)."""
    import queue
    import threading

    app = celery_app(url, "web-login", confirm=not is_redis(url), timeout=budget)
    arrivals: queue.Queue = queue.Queue()
    ready = threading.Barrier(workers + 1)

    def connect():
        c = app.connection_for_write()
        c.ensure_connection(max_retries=1, timeout=budget)
        return c, app.amqp.Producer(c)

    def worker():
        conn = producer = None
        try:
            conn, producer = connect()
        except Exception as e:
            out.put(("error", f"web-login could not connect: {e!r}"))
        ready.wait()
        while True:
            item = arrivals.get()
            if item is None:
                break
            slot, tid = item
            age = time.time() - slot
            if age >= budget:
                out.put(("publish", slot, age, False, "late", tid, 0.0))
                continue
            p0 = time.perf_counter()
            try:
                if conn is None:
                    conn, producer = connect()
                left = max(0.05, budget - (time.time() - slot))
                app.send_task(
                    CRITICAL_TASK,
                    args=[{"user": f"u{int(slot * 1000) % 100000}", "ip": "203.0.113.7", "ok": True}],
                    task_id=tid,
                    producer=producer,
                    retry=False,
                    timeout=left,
                    confirm_timeout=left,
                )
                out.put(("publish", slot, time.time() - slot, True, "", tid, time.perf_counter() - p0))
            except Exception as e:  # timed out, nacked, OOM, connection lost: a failed login
                out.put(("publish", slot, time.time() - slot, False, error_kind(e), tid,
                         time.perf_counter() - p0))
                if conn is not None:
                    try:
                        conn.collect()  # drop the socket without a close handshake
                    except Exception:
                        pass
                conn = producer = None
        if conn is not None:
            try:
                conn.release()
            except Exception:
                pass

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    ready.wait()
    out.put(("ready",))
    interval = 1.0 / rate
    next_t = time.time()
    parent = os.getppid()
    while not stop.is_set() and not orphaned(parent):
        now = time.time()
        if now < next_t:
            stop.wait(min(next_t - now, 0.05))
            continue
        arrivals.put((next_t, str(uuid.uuid4())))
        next_t += interval
    for _ in threads:
        arrivals.put(None)
    for t in threads:
        t.join(timeout=budget + 5)
    out.put(("done",))
