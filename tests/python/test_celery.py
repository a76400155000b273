"""Celery producers through sluice: a flood is diverted or paced, and no task is lost or doubled.

Celery (kombu over py-amqp) publishes with ``confirm_publish``; the producer is named through
py-amqp's ``client_properties`` (kombu passes ``broker_transport_options`` on to
``amqp.Connection``). Queue depths are read directly from RabbitMQ.
"""

from __future__ import annotations

import time

import pytest
from celery import Celery

pytestmark = pytest.mark.timeout(120)

TASK = "reports.rebuild"


def celery_app(s, producer: str, queue: str) -> Celery:
    app = Celery(f"sluice-test-{producer}", set_as_current=False)
    app.conf.update(
        broker_url=s.url,
        broker_transport_options={
            "confirm_publish": True,
            "client_properties": {"connection_name": producer},
        },
        broker_connection_timeout=10,
        task_default_queue=queue,
        result_backend=None,
        task_ignore_result=True,
    )
    return app


def send_tasks(app: Celery, n: int) -> float:
    """``send_task`` ``n`` times as fast as Celery allows; returns the seconds it took."""
    start = time.monotonic()
    for i in range(n):
        app.send_task(TASK, args=[i])
    return time.monotonic() - start


def accepted_connections(s) -> float:
    return sum(v for name, _, v in s.metrics() if name == "sluice_connections_accepted_total")


def test_celery_flood_over_quota_is_diverted_to_overflow_and_nothing_is_lost(sluice, broker, names):
    tasks_q = broker.declare_queue(names.queue("celery-tasks"))
    broker.track_exchange(tasks_q)  # Celery's default exchange is named after the default queue
    # The divert target must exist before sluice starts: sluice checks it at config load.
    overflow_q = broker.declare_queue(names.queue("celery-overflow"))
    producer = names.producer("celery-divert")
    s = sluice(
        f"""
[[quota]]
name = "celery-flood"
match = {{ producer = "celery-divert-*" }}
messages = "50/s"
burst = 20
on_exceed = {{ divert = {{ exchange = "", routing_key = "{overflow_q}" }} }}
"""
    )
    app = celery_app(s, producer, tasks_q)
    try:
        took = send_tasks(app, 500)
    finally:
        app.close()
    tasks = broker.settled_depth(tasks_q)
    overflow = broker.settled_depth(overflow_q)
    verdicts = s.messages_by_verdict(producer)
    print(
        f"500 tasks sent in {took:.2f}s ({500 / took:.0f}/s): task queue {tasks}, overflow {overflow}; "
        f"sluice verdicts {verdicts}; connections accepted {accepted_connections(s):.0f}"
    )
    assert tasks + overflow == 500, "tasks were lost or published twice"
    assert overflow > 0, "nothing was diverted"
    assert tasks >= 20, "the burst allowance was not forwarded"
    assert verdicts.get("divert") == overflow, verdicts
    assert verdicts.get("forward") == tasks, verdicts
    assert not verdicts.get("shed"), verdicts


def test_celery_flood_under_delay_is_paced_and_every_task_lands(sluice, broker, names):
    tasks_q = broker.declare_queue(names.queue("celery-delay"))
    broker.track_exchange(tasks_q)
    producer = names.producer("celery-delay")
    s = sluice(
        """
[[quota]]
name = "celery-paced"
match = { producer = "celery-delay-*" }
messages = "100/s"
burst = 20
on_exceed = { delay = "5s", then = "shed" }
"""
    )
    n = 600
    accepted_before = accepted_connections(s)  # includes the fixture's readiness probes
    app = celery_app(s, producer, tasks_q)
    try:
        took = send_tasks(app, n)
    finally:
        app.close()
    tasks = broker.settled_depth(tasks_q)
    verdicts = s.messages_by_verdict(producer)
    accepted = accepted_connections(s) - accepted_before
    print(
        f"{n} tasks sent in {took:.2f}s = {n / took:.0f} tasks/s against a 100/s quota "
        f"(burst 20); task queue {tasks}; sluice verdicts {verdicts}; Celery connections {accepted:.0f}"
    )
    # Pacing must not make the client's kernel abort the socket (py-amqp sets TCP_USER_TIMEOUT):
    # Celery would reconnect silently and republish.
    assert accepted == 1, f"Celery connected {accepted:.0f} times for one burst of tasks"
    assert tasks == n, f"{n} tasks sent, {tasks} in the queue"
    assert took > 3.0, f"{n} tasks at 100/s took only {took:.2f}s: they were not delayed"
    # A delayed publish is counted under "delay" once it goes through; none may be shed.
    assert not verdicts.get("shed"), verdicts
    assert verdicts.get("forward", 0) > 0, verdicts
    assert verdicts.get("delay", 0) > 0, f"no task was held (Celery sent {n / took:.0f}/s): {verdicts}"
    assert verdicts.get("forward", 0) + verdicts.get("delay", 0) == n, verdicts
