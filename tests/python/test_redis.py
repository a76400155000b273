"""Real Redis clients through sluice's ``redis`` listener, against the real Redis on 6379.

* redis-py pipelines with shed pushes in the middle get every reply in its own place;
* Celery with ``broker_url = redis://…`` through sluice: ``celery_task_quota`` limits
  ``reports.rebuild`` by task name while ``auth.*`` passes, diverted tasks land in the overflow
  list, a worker that consumes through sluice runs every forwarded and diverted task, and a shed
  ``send_task`` raises in the producer instead of vanishing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from conftest import REDIS_HOST, REDIS_PORT

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "plugins" / "dist" / "celery_task_quota.wasm"


@pytest.fixture
def rdb():
    """Redis directly (not through sluice); deletes every key the test registers."""
    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    keys: list[str] = []
    r.track = keys.append  # type: ignore[attr-defined]
    try:
        yield r
    finally:
        if keys:
            r.delete(*keys)
        # Celery/kombu bookkeeping for the test's queues.
        for k in r.scan_iter(match="_kombu.binding.*sluice-test*"):
            r.delete(k)
        r.close()


def shed_quota(producer: str, burst: int) -> str:
    return f"""
[[quota]]
name = "flood"
match = {{ producer = "{producer}" }}
messages = "1/min"
burst = {burst}
on_exceed = {{ shed = "too fast" }}
"""


def test_redis_py_pipeline_gets_each_reply_in_place_with_sheds_in_the_middle(sluice, rdb, names):
    producer = names.producer("redis-pipe")
    q, k = names.queue("redis-q"), names.queue("redis-k")
    rdb.track(q)
    rdb.track(k)
    s = sluice(shed_quota(producer, 3), redis=True)
    c = redis.Redis(host="127.0.0.1", port=s.redis_port, client_name=producer)

    p = c.pipeline(transaction=False)
    for i in range(6):
        p.rpush(q, f"m{i}")
        p.incr(k)
    p.llen(q)
    out = p.execute(raise_on_error=False)

    pushes, incrs, llen = out[0:12:2], out[1:12:2], out[12]
    assert pushes[:3] == [1, 2, 3], out
    for r in pushes[3:]:
        assert isinstance(r, redis.exceptions.ResponseError), out
        assert "SLUICE shed: too fast" in str(r)
    assert incrs == [1, 2, 3, 4, 5, 6], "every other command got its own reply"
    assert llen == 3
    assert rdb.lrange(q, 0, -1) == [b"m0", b"m1", b"m2"]
    assert s.messages_by_verdict(producer).get("shed") == 3

    # A transactional pipeline with one push over the quota is refused as a whole.
    t = c.pipeline(transaction=True)
    t.incr(k)
    t.rpush(q, "late")
    with pytest.raises(redis.exceptions.ResponseError, match="SLUICE shed"):
        t.execute()
    assert int(rdb.get(k)) == 6, "nothing of the shed transaction ran"
    c.close()


def celery_app(broker_url: str, queue: str) -> Celery:
    app = Celery(f"sluice-redis-{queue}", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        broker_connection_timeout=10,
        broker_connection_retry_on_startup=False,
        task_default_queue=queue,
        result_backend=None,
        task_ignore_result=True,
    )
    return app


def plugin_policy(on_exceed: str, burst: int) -> str:
    assert PLUGIN.exists(), f"{PLUGIN} missing: run make plugins"
    return f"""
[[policy]]
name = "celery-tasks"
plugin = "{PLUGIN}"
fail = "open"
time_budget = "25ms"
config = {{ limits = [{{ match = "reports.*", rate = "1/min burst {burst}" }}], critical = ["auth.*"], on_exceed = {on_exceed} }}
"""


WORKER_MODULE = """
import os
import socket
import redis
from celery import Celery

app = Celery("sluice_redis_worker", broker=os.environ["BROKER_URL"])
app.conf.update(task_default_queue=os.environ["QUEUE"], result_backend=None, task_ignore_result=True,
                worker_hijack_root_logger=False)
done = redis.Redis(host=os.environ["REDIS_HOST"], port=int(os.environ["REDIS_PORT"]))


@app.task(name="reports.rebuild")
def rebuild(i):
    done.sadd(os.environ["DONE"], f"reports.rebuild:{i}")


@app.task(name="auth.login_audit")
def audit(i):
    done.sadd(os.environ["DONE"], f"auth.login_audit:{i}")
"""


def test_celery_on_redis_limits_by_task_name_and_a_worker_runs_every_task(
    sluice, rdb, names, tmp_path
):
    queue = names.queue("celery-redis")
    overflow = f"overflow.{queue}"
    done_key = names.queue("celery-redis-done")
    for key in (queue, overflow, done_key):
        rdb.track(key)
    s = sluice(
        plugin_policy(f'{{ divert = {{ exchange = "", routing_key = "{overflow}" }} }}', 5),
        redis=True,
    )
    url = f"redis://127.0.0.1:{s.redis_port}/0"
    app = celery_app(url, queue)
    with app.connection_for_write() as conn:
        for i in range(30):
            app.send_task("reports.rebuild", args=[i], connection=conn)
            app.send_task("auth.login_audit", args=[i], connection=conn)

    # Limited by task name: 5 rebuilds forwarded, 25 diverted; every login audit forwarded.
    assert rdb.llen(queue) == 35
    assert rdb.llen(overflow) == 25
    verdicts = {}
    for name, labels, value in s.metrics():
        if name == "sluice_messages_total" and labels.get("protocol") == "redis":
            verdicts[labels["verdict"]] = verdicts.get(labels["verdict"], 0) + value
    assert verdicts.get("divert") == 25 and verdicts.get("forward") == 35, verdicts

    # A real worker, consuming through sluice from both lists, runs all 60 tasks.
    (tmp_path / "sluice_redis_worker.py").write_text(WORKER_MODULE)
    env = {
        **os.environ,
        "BROKER_URL": url,
        "QUEUE": queue,
        "DONE": done_key,
        "REDIS_HOST": REDIS_HOST,
        "REDIS_PORT": str(REDIS_PORT),
        "PYTHONPATH": str(tmp_path),
    }
    worker = subprocess.Popen(
        [
            sys.executable, "-m", "celery", "-A", "sluice_redis_worker", "worker",
            "-Q", f"{queue},{overflow}", "-P", "solo", "--without-heartbeat",
            "--without-gossip", "--without-mingle", "-l", "WARNING",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "worker.log", "wb"),
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and rdb.scard(done_key) < 60:
            time.sleep(0.2)
        ran = {m.decode() for m in rdb.smembers(done_key)}
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
    want = {f"reports.rebuild:{i}" for i in range(30)} | {f"auth.login_audit:{i}" for i in range(30)}
    assert ran == want, (
        f"missing {sorted(want - ran)[:10]}; worker log:\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
    )
    assert rdb.llen(queue) == 0 and rdb.llen(overflow) == 0


def test_celery_on_redis_shed_send_task_raises_in_the_producer(sluice, rdb, names):
    queue = names.queue("celery-redis-shed")
    rdb.track(queue)
    s = sluice(plugin_policy('"shed"', 2), redis=True)
    app = celery_app(f"redis://127.0.0.1:{s.redis_port}/0", queue)
    sent, raised = 0, []
    with app.connection_for_write() as conn:
        for i in range(6):
            try:
                app.send_task("reports.rebuild", args=[i], connection=conn, retry=False)
                sent += 1
            except Exception as e:  # kombu may wrap redis-py's ResponseError
                raised.append(e)
        app.send_task("auth.login_audit", args=[0], connection=conn, retry=False)
    assert sent == 2, f"two within the burst, got {sent}"
    assert len(raised) == 4 and all("SLUICE shed" in str(e) for e in raised), raised
    assert rdb.llen(queue) == 3, "2 rebuilds and the login audit are queued; no shed task is"


def paced_pipeline(sluice, rdb, names, tag: str, limits: str) -> dict:
    """A redis-py client that, like py-amqp, sets ``TCP_USER_TIMEOUT`` = 1 s writes a pipeline of
    2,200 RPUSHes of 2 KB (it writes every command before it reads a reply) through a sluice that
    paces it to 75 pushes/s."""
    producer = names.producer(f"redis-paced-{tag}")
    key = names.queue(f"redis-paced-{tag}")
    rdb.track(key)
    s = sluice(
        f"""
{limits}
[[quota]]
name = "paced"
match = {{ producer = "redis-paced-*" }}
messages = "75/s"
burst = 10
on_exceed = {{ delay = "60s" }}
""",
        redis=True,
    )
    n = 2200
    client = redis.Redis(
        host="127.0.0.1",
        port=s.redis_port,
        client_name=producer,
        socket_keepalive=True,
        socket_keepalive_options={socket.TCP_USER_TIMEOUT: 1000},
        socket_timeout=120,
    )
    error = None
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            pipe.rpush(key, f"{i:06d}".encode() + b"v" * 2000)
        replies = pipe.execute()
        ok = sum(1 for r in replies if isinstance(r, int))
    except redis.exceptions.RedisError as e:
        error, ok = repr(e), 0
    finally:
        client.close()
    return {
        "error": error,
        "ok_replies": ok,
        "in_redis": rdb.llen(key),
        "verdicts": s.messages_by_verdict(producer),
    }


def test_a_paced_redis_client_with_a_short_user_timeout_keeps_its_connection(sluice, rdb, names):
    """The Redis listener paces a producer the same way as the AMQP one (by reading it no faster
    than its quota) and reads it ahead the same way (``max_read_ahead``), so a client whose socket
    has a 1 s ``TCP_USER_TIMEOUT`` is not aborted by its own kernel while it waits. Control:
    with read-ahead off, the pipeline fails with a connection error and most pushes never land."""
    control = paced_pipeline(sluice, rdb, names, "control", '[limits]\nmax_read_ahead = "0"')
    print(f"read-ahead off: {control}")
    assert control["error"] and control["in_redis"] < 2200, (
        f"the control did not reproduce the abort (kernel without zero-window user timeouts?): {control}"
    )
    paced = paced_pipeline(sluice, rdb, names, "paced", "")
    print(f"read-ahead on (default): {paced}")
    assert paced["error"] is None, paced
    assert paced["ok_replies"] == paced["in_redis"] == 2200, paced
    assert paced["verdicts"].get("delay", 0) > 0, f"nothing was paced: {paced}"
