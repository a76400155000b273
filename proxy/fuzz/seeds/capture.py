#!/usr/bin/env python3
"""Regenerate the fuzz seed corpus from real AMQP client traffic.

A recording TCP relay is put between real clients (pika, py-amqp with AMQPLAIN, Celery, and the
lapin client in seeds/lapin-client when cargo is available) and a RabbitMQ broker (default
127.0.0.1:5672, guest/guest). Both directions of every connection are recorded, split into frames,
and written as seeds, one file per distinct input, named by its SHA-1:

  corpus/frame/        frame-aligned windows of each stream (two control bytes first, see the target)
  corpus/method/       method frame payloads (class id, method id, arguments)
  corpus/header/       content header payloads
  corpus/header_diff/  the same
  corpus/table/        table bodies: message headers, client/server properties, AMQPLAIN responses
  corpus/handshake/    connection.start-ok arguments
  corpus/config/       config/sluice.toml and seeds/config/*.toml

Usage (from anywhere):
  python3 -m venv /tmp/fuzzvenv && /tmp/fuzzvenv/bin/pip install pika celery
  /tmp/fuzzvenv/bin/python proxy/fuzz/seeds/capture.py [--broker 127.0.0.1:5672] [--no-lapin]
then minimise each directory with `cargo fuzz cmin <target>` (see ../README.md).
"""

import argparse
import datetime
import decimal
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.dirname(HERE)
REPO = os.path.dirname(os.path.dirname(FUZZ))
CORPUS = os.path.join(FUZZ, "corpus")

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_WINDOW = 4096  # largest frame-target seed


# --- recording relay ----------------------------------------------------------------------------

class Relay:
    """Accepts clients on an ephemeral loopback port and forwards them to the broker, recording
    every byte in both directions."""

    def __init__(self, broker):
        host, port = broker.rsplit(":", 1)
        self.broker = (host, int(port))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.streams = []  # (client_to_broker bytearray, broker_to_client bytearray)
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.broker)
            c2b, b2c = bytearray(), bytearray()
            with self.lock:
                self.streams.append((c2b, b2c))
            for src, dst, rec in ((client, upstream, c2b), (upstream, client, b2c)):
                threading.Thread(target=self._pump, args=(src, dst, rec), daemon=True).start()

    @staticmethod
    def _pump(src, dst, rec):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                rec.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


# --- client workloads ---------------------------------------------------------------------------

HEADERS = {
    "lang": "py",
    "task": "reports.rebuild",
    "id": str(uuid.UUID(int=0x6F1C42)),
    "retries": 0,
    "big": 1 << 40,
    "neg": -7,
    "flag": True,
    "nothing": None,
    "price": decimal.Decimal("12.50"),
    "when": datetime.datetime(2024, 5, 1, 12, 0, 0),
    "nested": {"x-inner": "v", "n": 1, "deeper": {"k": [1, "two", False]}},
    "list": ["a", 2, {"t": "u"}, []],
    "raw": b"\x00\x01\xfe\xff",
    "unicode": "r\u00e9sum\u00e9 \u2713",
}


def run_pika(port, queue):
    import pika

    params = pika.ConnectionParameters(
        "127.0.0.1", port, "/", pika.PlainCredentials("guest", "guest"),
        client_properties={"connection_name": "fuzz-seed-pika", "product": "pika"},
        heartbeat=30, frame_max=8192,
    )
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.queue_declare(queue, durable=False, auto_delete=True)
    ch.confirm_delivery()
    props = pika.BasicProperties(
        content_type="application/json", content_encoding="utf-8", headers=HEADERS,
        delivery_mode=2, priority=3, correlation_id="corr-1", reply_to="replies.fuzz",
        expiration="60000", message_id="msg-1", timestamp=1714564800, type="report",
        user_id="guest", app_id="billing", cluster_id="",
    )
    ch.basic_publish("", queue, b'{"hello": "world"}', props)
    ch.basic_publish("", queue, b"x" * 20000, pika.BasicProperties(app_id="bulk"))  # body frames
    ch.basic_publish("", queue, b"", pika.BasicProperties())  # no properties, empty body
    try:  # unroutable mandatory publish: basic.return
        ch.basic_publish("amq.direct", "nowhere", b"m", pika.BasicProperties(), mandatory=True)
    except pika.exceptions.UnroutableError:
        pass
    ch.basic_get(queue, auto_ack=True)
    try:  # publish to a missing exchange: channel.close 404 from the broker
        ch.basic_publish("no-such-exchange-fuzz", "k", b"m")
    except pika.exceptions.ChannelClosedByBroker:
        pass
    conn.close()


def run_py_amqp(port, queue):
    import amqp

    for method in ("AMQPLAIN", "PLAIN"):
        conn = amqp.Connection(
            host=f"127.0.0.1:{port}", userid="guest", password="guest", login_method=method,
            client_properties={"connection_name": f"fuzz-seed-py-amqp-{method.lower()}"},
        )
        conn.connect()
        ch = conn.channel()
        ch.confirm_select()
        ch.queue_declare(queue, auto_delete=True)
        ch.exchange_declare("fuzz-seed-topic", "topic", auto_delete=True)
        msg = amqp.Message(
            b"payload", content_type="text/plain", application_headers=dict(HEADERS, f=1.5),
            delivery_mode=1, priority=9, message_id="py-amqp-1", timestamp=1714564800,
        )
        ch.basic_publish(msg, exchange="", routing_key=queue)
        ch.basic_publish(amqp.Message(b"t"), exchange="fuzz-seed-topic", routing_key="a.b.c")
        ch.basic_consume(queue, callback=lambda m: m.channel.basic_ack(m.delivery_tag))
        try:
            conn.drain_events(timeout=1)
        except socket.timeout:
            pass
        ch.close()
        conn.close()


def run_celery(port):
    from celery import Celery

    app = Celery("fuzzseed", broker=f"amqp://guest:guest@127.0.0.1:{port}//")
    app.conf.broker_transport_options = {"confirm_publish": True}
    app.conf.task_default_queue = "fuzz-seed-celery"
    for i in range(2):
        app.send_task("reports.rebuild", args=[i, "full"], kwargs={"force": bool(i)},
                      priority=i, countdown=None, retries=i)
    app.send_task("mail.send", args=[], kwargs={}, queue="fuzz-seed-celery-mail",
                  expires=60)
    app.pool.force_close_all()
    app.close()


def run_lapin(port, target_dir):
    client = os.path.join(HERE, "lapin-client")
    env = dict(os.environ, CARGO_TARGET_DIR=target_dir)
    subprocess.run(["cargo", "build", "-q", "--manifest-path", os.path.join(client, "Cargo.toml")],
                   check=True, env=env)
    subprocess.run([os.path.join(target_dir, "debug", "lapin-seed-client"),
                    f"amqp://guest:guest@127.0.0.1:{port}/%2f"], check=True)


# --- splitting and writing ----------------------------------------------------------------------

def frames(stream):
    """Yield (type, channel, payload, raw) for each whole frame."""
    at = 0
    while at + 7 <= len(stream):
        ftype, channel, size = struct.unpack_from(">BHI", stream, at)
        end = at + 7 + size + 1
        if end > len(stream):
            return
        yield ftype, channel, bytes(stream[at + 7:end - 1]), bytes(stream[at:end])
        at = end


def short_str(b, at):
    n = b[at]
    return b[at + 1:at + 1 + n], at + 1 + n


def long_bytes(b, at):
    (n,) = struct.unpack_from(">I", b, at)
    return b[at + 4:at + 4 + n], at + 4 + n


def header_table(payload):
    """The headers table body of a content header payload, if any."""
    flags = struct.unpack_from(">H", payload, 12)[0]
    at = 14
    for bit in range(15, 1, -1):
        if not flags & (1 << bit):
            continue
        if bit == 13:  # headers
            return long_bytes(payload, at)[0]
        if bit in (12, 11):  # delivery mode, priority
            at += 1
        elif bit == 6:  # timestamp
            at += 8
        else:
            at = short_str(payload, at)[1]
    return None


class Seeds:
    def __init__(self):
        self.written = {}

    def add(self, target, data):
        d = os.path.join(CORPUS, target)
        os.makedirs(d, exist_ok=True)
        name = hashlib.sha1(data).hexdigest()
        path = os.path.join(d, name)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
            self.written[target] = self.written.get(target, 0) + 1


def write_stream_seeds(seeds, stream, from_client):
    if from_client:
        if not stream.startswith(PROTOCOL_HEADER):
            return
        stream = stream[len(PROTOCOL_HEADER):]  # sluice reads the protocol header before splitting
    window = bytearray()
    for ftype, _channel, payload, raw in frames(stream):
        if len(window) + len(raw) > FRAME_WINDOW and window:
            # frame_max mode 2 (131072), whole-stream reads of 64 bytes
            seeds.add("frame", b"\x02\x3f" + bytes(window))
            window.clear()
        if len(raw) <= FRAME_WINDOW:
            window.extend(raw)
        if ftype == 1 and len(payload) >= 4:
            cls, meth = struct.unpack_from(">HH", payload)
            seeds.add("method", payload)
            args = payload[4:]
            if (cls, meth) == (10, 11):  # connection.start-ok
                seeds.add("handshake", args)
                props, at = long_bytes(args, 0)
                seeds.add("table", props)
                mech, at = short_str(args, at)
                resp, _ = long_bytes(args, at)
                if mech == b"AMQPLAIN":
                    seeds.add("table", resp)
            elif (cls, meth) == (10, 10):  # connection.start: server properties
                seeds.add("table", long_bytes(args, 2)[0])
        elif ftype == 2 and len(payload) >= 14:
            seeds.add("header", payload)
            seeds.add("header_diff", payload)
            t = header_table(payload)
            if t is not None:
                seeds.add("table", t)
    if window:
        seeds.add("frame", b"\x02\x3f" + bytes(window))


def write_config_seeds(seeds):
    paths = [os.path.join(REPO, "config", "sluice.toml")]
    variants = os.path.join(HERE, "config")
    paths += sorted(os.path.join(variants, n) for n in os.listdir(variants) if n.endswith(".toml"))
    for p in paths:
        with open(p, "rb") as f:
            seeds.add("config", f.read())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--broker", default="127.0.0.1:5672")
    ap.add_argument("--no-lapin", action="store_true", help="skip the lapin (Rust) client")
    ap.add_argument("--lapin-target-dir", default="/var/tmp/sluice-fuzz-lapin-client")
    ap.add_argument("--clean", action="store_true", help="empty the corpus directories first")
    args = ap.parse_args()

    if args.clean:
        for t in ("frame", "method", "header", "header_diff", "table", "handshake", "config"):
            shutil.rmtree(os.path.join(CORPUS, t), ignore_errors=True)

    relay = Relay(args.broker)
    queue = "fuzz-seed-" + uuid.uuid4().hex[:8]
    run_pika(relay.port, queue)
    run_py_amqp(relay.port, queue)
    run_celery(relay.port)
    if not args.no_lapin and shutil.which("cargo"):
        run_lapin(relay.port, args.lapin_target_dir)
    time.sleep(0.5)  # let the pumps see the last bytes
    relay.close()

    seeds = Seeds()
    for c2b, b2c in relay.streams:
        write_stream_seeds(seeds, bytes(c2b), True)
        write_stream_seeds(seeds, bytes(b2c), False)
    write_config_seeds(seeds)
    print(f"{len(relay.streams)} connections recorded; new seeds: "
          + ", ".join(f"{t}={n}" for t, n in sorted(seeds.written.items())))


if __name__ == "__main__":
    sys.exit(main())
