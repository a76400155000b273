"""pika through sluice: what a producer sees when its publishes are shed, and that nothing else is.

Each test starts its own sluice with a quota on producers named ``pika-flood-*`` (and, for the
channel-close test, ``pika-slow-*``) and reads queue depths directly from RabbitMQ, not through sluice.
"""

from __future__ import annotations

import threading
import time

import pika
import pika.exceptions
import pytest

pytestmark = pytest.mark.timeout(90)

FLOOD_QUOTA = """
[[quota]]
name = "flood"
match = { producer = "pika-flood-*" }
messages = "20/s"
burst = 5
on_exceed = "shed"
"""

AMQP_SETTINGS = """
[amqp]
shed_unconfirmed = "{unconfirmed}"
shed_mandatory = "{mandatory}"
blocked_after = "2s"
"""


def config(unconfirmed: str = "drop", mandatory: str = "nack") -> str:
    return AMQP_SETTINGS.format(unconfirmed=unconfirmed, mandatory=mandatory) + FLOOD_QUOTA


def publish_confirmed(ch, queue: str, n: int, mandatory: bool = False, tag: str = "m"):
    """Publish ``n`` messages with confirms, as fast as pika allows. Returns (ok, nacked, returned)
    where ``returned`` is the list of pika ReturnedMessage."""
    ok = nacked = 0
    returned = []
    for i in range(n):
        try:
            ch.basic_publish(
                exchange="",
                routing_key=queue,
                body=f"{tag}-{i}".encode(),
                mandatory=mandatory,
            )
            ok += 1
        except pika.exceptions.NackError:
            nacked += 1
        except pika.exceptions.UnroutableError as e:
            returned.extend(e.messages)
    return ok, nacked, returned


def assert_still_usable(conn, ch, queue: str, broker) -> None:
    """The connection and channel that saw sheds still work: a confirmed publish goes through once
    the bucket has refilled, and it lands in the queue."""
    assert conn.is_open and ch.is_open
    before = broker.settled_depth(queue)
    time.sleep(1.0)  # 20/s refills the bucket
    ok = ch.queue_declare(queue=queue, passive=True)
    assert ok.method.message_count == before
    ch.basic_publish(exchange="", routing_key=queue, body=b"after")  # raises if nacked
    assert broker.settled_depth(queue) == before + 1


def test_shed_publish_raises_nack_error_and_broker_holds_only_acked(sluice, broker, names):
    queue = broker.declare_queue(names.queue("shed-nack"))
    s = sluice(config(mandatory="nack"))
    producer = names.producer("pika-flood")
    conn = pika.BlockingConnection(s.params(producer))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ok, nacked, returned = publish_confirmed(ch, queue, 200)
        print(f"confirmed publishes: ok={ok} nacked={nacked}")
        assert not returned
        assert ok + nacked == 200
        assert nacked > 0, "a 200-message burst against 20/s burst 5 was never shed"
        assert ok >= 5, "the burst allowance was not forwarded"
        assert broker.settled_depth(queue) == ok
        verdicts = s.messages_by_verdict(producer)
        assert verdicts.get("shed") == nacked and verdicts.get("forward") == ok, verdicts
        assert_still_usable(conn, ch, queue, broker)
    finally:
        if conn.is_open:
            conn.close()


def test_shed_mandatory_publish_raises_unroutable_error_not_nack(sluice, broker, names):
    queue = broker.declare_queue(names.queue("shed-return"))
    s = sluice(config(mandatory="return"))
    conn = pika.BlockingConnection(s.params(names.producer("pika-flood")))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ok, nacked, returned = publish_confirmed(ch, queue, 200, mandatory=True)
        print(f"mandatory publishes: ok={ok} returned={len(returned)} nacked={nacked}")
        assert nacked == 0, "a shed mandatory publish was nacked although shed_mandatory = return"
        assert ok + len(returned) == 200
        assert returned, "a 200-message burst against 20/s burst 5 was never shed"
        for m in returned:
            assert m.method.reply_code == 312, m.method
            assert "sluice" in m.method.reply_text, m.method
            assert m.method.routing_key == queue
            assert m.body.startswith(b"m-"), "the returned message lost its body"
        assert broker.settled_depth(queue) == ok
        assert_still_usable(conn, ch, queue, broker)
    finally:
        if conn.is_open:
            conn.close()


def close_channel_scenario(s, broker, queue: str, producer: str, pause: float) -> None:
    """Publish without confirms until sluice closes the channel; check the 406 close, that only
    forwarded publishes reached the queue, and that a new channel on the same connection works.
    ``pause`` > 0 lets pika read incoming frames for that long after each publish, so no publish
    is in flight when the close arrives; ``pause == 0`` publishes as fast as pika can."""
    conn = pika.BlockingConnection(s.params(producer))
    try:
        ch = conn.channel()
        closed = None
        sent = 0
        for i in range(2000):
            try:
                ch.basic_publish(exchange="", routing_key=queue, body=f"m-{i}".encode())
                sent += 1
                if pause:
                    conn.process_data_events(time_limit=pause)
                if ch.is_closed:
                    break
            except pika.exceptions.ChannelClosedByBroker as e:
                closed = e
                break
        if closed is None:
            # The close may still be in flight: let pika read it.
            deadline = time.monotonic() + 5
            while ch.is_open and time.monotonic() < deadline:
                conn.process_data_events(time_limit=0.1)
            assert ch.is_closed, f"{sent} publishes without confirms never closed the channel"
            closed = ch._closing_reason  # the ChannelClosedByBroker pika recorded
        print(f"publishes written before the close: {sent}; close: {closed!r}")
        assert isinstance(closed, pika.exceptions.ChannelClosedByBroker), closed
        assert closed.reply_code == 406
        assert "sluice" in closed.reply_text and "shed" in closed.reply_text, closed.reply_text
        assert ch.is_closed

        # The connection survives: a new channel on it works, and its publish lands.
        assert conn.is_open
        landed = broker.settled_depth(queue)
        assert 1 <= landed < sent, f"{landed} of {sent} publishes reached the queue"
        time.sleep(1.0)  # the bucket refills
        ch2 = conn.channel()
        ch2.confirm_delivery()
        assert ch2.queue_declare(queue=queue, passive=True).method.message_count == landed
        ch2.basic_publish(exchange="", routing_key=queue, body=b"after")  # raises if nacked
        assert broker.settled_depth(queue) == landed + 1
        assert conn.is_open
    finally:
        if conn.is_open:
            conn.close()


SLOW_QUOTA = """
[[quota]]
name = "slow"
match = { producer = "pika-slow-*" }
messages = "1/s"
burst = 3
on_exceed = "shed"
"""


def test_shed_without_confirms_closes_channel_406_and_connection_stays_open(sluice, broker, names):
    """A publisher that reads between publishes (nothing in flight when the close arrives)."""
    queue = broker.declare_queue(names.queue("shed-close-slow"))
    s = sluice(config(unconfirmed="close_channel") + SLOW_QUOTA)
    close_channel_scenario(s, broker, queue, names.producer("pika-slow"), pause=0.1)


def test_shed_without_confirms_closes_channel_406_with_publishes_in_flight(sluice, broker, names):
    """A publisher as fast as pika allows: publishes cross sluice's channel.close on the wire. AMQP
    says frames on a channel being closed are discarded until close-ok; the connection must live."""
    queue = broker.declare_queue(names.queue("shed-close-fast"))
    s = sluice(config(unconfirmed="close_channel"))
    close_channel_scenario(s, broker, queue, names.producer("pika-flood"), pause=0)


def test_producer_outside_the_quota_gets_every_publish_acked_during_a_flood(sluice, broker, names):
    flood_q = broker.declare_queue(names.queue("flood"))
    calm_q = broker.declare_queue(names.queue("calm"))
    s = sluice(config())
    flood_name = names.producer("pika-flood")
    calm_name = names.producer("pika-calm")
    n_calm = 300
    max_flood = 20000  # bound: the flood runs until the calm producer is done

    started = threading.Barrier(2, timeout=30)
    calm_done = threading.Event()
    results: dict[str, object] = {}

    def flood():
        ok = nacked = 0
        try:
            conn = pika.BlockingConnection(s.params(flood_name))
            try:
                ch = conn.channel()
                ch.confirm_delivery()
                started.wait()
                for i in range(max_flood):
                    if calm_done.is_set() and i >= 200:
                        break
                    try:
                        ch.basic_publish(exchange="", routing_key=flood_q, body=f"flood-{i}".encode())
                        ok += 1
                    except pika.exceptions.NackError:
                        nacked += 1
            finally:
                conn.close()
        except BaseException as e:  # reported by the main thread
            results["flood_error"] = e
        results["flood"] = (ok, nacked)
        results["flood_end"] = time.monotonic()

    t = threading.Thread(target=flood, name="flood", daemon=True)
    t.start()

    conn = pika.BlockingConnection(s.params(calm_name))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        started.wait()
        calm_start = time.monotonic()
        nacked_at = []
        for i in range(n_calm):
            try:
                ch.basic_publish(exchange="", routing_key=calm_q, body=f"calm-{i}".encode())
            except (pika.exceptions.NackError, pika.exceptions.UnroutableError):
                nacked_at.append(i)
        calm_end = time.monotonic()
    finally:
        calm_done.set()
        if conn.is_open:
            conn.close()
    t.join(timeout=60)
    assert not t.is_alive(), "the flood producer did not finish"
    if "flood_error" in results:
        raise results["flood_error"]

    ok, nacked = results["flood"]
    print(
        f"calm: {n_calm} publishes in {calm_end - calm_start:.2f}s, nacked {len(nacked_at)}; "
        f"flood meanwhile: ok={ok} nacked={nacked}, "
        f"ended {results['flood_end'] - calm_end:+.2f}s after the calm producer"
    )
    assert not nacked_at, f"publishes of a producer no quota matches were nacked: {nacked_at[:20]}"
    assert results["flood_end"] >= calm_end, "the flood did not last as long as the calm producer"
    assert nacked > 0, "the flood producer was not shed"
    assert broker.settled_depth(calm_q) == n_calm
    assert broker.settled_depth(flood_q) == ok

    by_verdict = s.messages_by_verdict(calm_name)
    assert by_verdict.get("forward") == n_calm, by_verdict
    assert not by_verdict.get("shed"), by_verdict
    flood_verdicts = s.messages_by_verdict(flood_name)
    assert flood_verdicts.get("shed") == nacked, flood_verdicts


LIMITS = """
[limits]
max_channels = 3
max_message_size = "64KiB"
"""


def test_limits_as_pika_sees_them(sluice, broker, names):
    """max_channels reaches pika as channel_max, so pika refuses a fourth channel by itself; a
    message over max_message_size closes its channel with RabbitMQ's own 406, and the connection
    and its other channels carry on."""
    big_q = broker.declare_queue(names.queue("limits-big"))
    other_q = broker.declare_queue(names.queue("limits-other"))
    s = sluice(LIMITS)
    conn = pika.BlockingConnection(s.params(names.producer("pika-limits")))
    try:
        assert conn._impl.params.channel_max == 3, conn._impl.params.channel_max
        big = conn.channel()
        big.confirm_delivery()
        other = conn.channel()
        other.confirm_delivery()
        third = conn.channel()
        with pytest.raises(pika.exceptions.NoFreeChannels):
            conn.channel()
        third.close()

        big.basic_publish(exchange="", routing_key=big_q, body=b"x" * (60 * 1024))
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
            big.basic_publish(exchange="", routing_key=big_q, body=b"x" * (100 * 1024))
        print(f"oversized publish: {closed.value!r}")
        assert closed.value.reply_code == 406
        assert "larger than configured max size" in closed.value.reply_text
        assert "max_message_size" in closed.value.reply_text
        assert big.is_closed and conn.is_open

        for i in range(5):
            other.basic_publish(exchange="", routing_key=other_q, body=f"o-{i}".encode())
        again = conn.channel()
        again.confirm_delivery()
        again.basic_publish(exchange="", routing_key=big_q, body=b"after")
        assert broker.settled_depth(big_q) == 2, "only the small message and the one after"
        assert broker.settled_depth(other_q) == 5
        hits = {
            labels.get("limit"): value
            for name, labels, value in s.metrics()
            if name == "sluice_limit_hits_total"
        }
        assert hits.get("max_message_size", 0) >= 1, hits
        assert hits.get("max_channels", 0) == 0, "pika never tried past the limit"
    finally:
        if conn.is_open:
            conn.close()
