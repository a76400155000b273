"""pika over TLS to sluice: sluice terminates TLS with its own certificate and forwards to the
broker; publishes are confirmed and consumed as they would be direct."""

import ssl
import subprocess
from pathlib import Path

import pika
import pytest

from conftest import GUEST


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1, signed by it."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=sluice test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d


def test_pika_with_an_ssl_context_publishes_with_confirms_and_consumes_through_sluice(sluice, broker, names, pki):
    s = sluice(f'[listener.tls]\ncert = "{pki / "server.pem"}"\nkey = "{pki / "server.key"}"\n')
    queue = broker.declare_queue(names.queue("tls"))
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    params = pika.ConnectionParameters(
        host="localhost",
        port=s.amqp_port,
        credentials=GUEST,
        ssl_options=pika.SSLOptions(context, "localhost"),
        connection_attempts=1,
        socket_timeout=10,
        client_properties={"connection_name": names.producer("pika-tls")},
    )
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for i in range(100):
            ch.basic_publish("", queue, str(i).encode())  # raises on nack
        got = []
        for method, _props, body in ch.consume(queue, inactivity_timeout=5):
            if method is None:
                break
            got.append(int(body))
            ch.basic_ack(method.delivery_tag)
            if len(got) == 100:
                break
        ch.cancel()
        assert got == list(range(100))
    finally:
        conn.close()


def test_plain_client_on_a_tls_listener_is_refused_and_counted(sluice, pki):
    s = sluice(f'[listener.tls]\ncert = "{pki / "server.pem"}"\nkey = "{pki / "server.key"}"\n')
    params = pika.ConnectionParameters(
        host="127.0.0.1", port=s.amqp_port, credentials=GUEST, connection_attempts=1, socket_timeout=5
    )
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(params)
    errors = sum(v for n, _l, v in s.metrics() if n == "sluice_protocol_errors_total")
    assert errors >= 1
    assert s.alive()


@pytest.fixture
def stunnel_redis(pki: Path, tmp_path: Path):
    """stunnel terminating TLS (server.pem, for localhost) in front of the local Redis; yields its port."""
    import shutil
    import socket
    import time

    from conftest import REDIS_HOST, REDIS_PORT, free_port

    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if binary is None:
        pytest.fail("stunnel is not installed: apt-get install -y stunnel4 (.ci/ensure-tools does)")
    port = free_port()
    conf = tmp_path / "stunnel-redis.conf"
    conf.write_text(
        f"foreground = yes\npid =\n[redis]\naccept = 127.0.0.1:{port}\n"
        f"connect = {REDIS_HOST}:{REDIS_PORT}\ncert = {pki / 'server.pem'}\nkey = {pki / 'server.key'}\n"
    )
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"stunnel did not listen on {port}")
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait()


def test_redis_py_over_tls_to_sluice_and_sluice_over_tls_to_redis(sluice, names, pki, stunnel_redis):
    import redis

    from conftest import REDIS_HOST, REDIS_PORT

    upstream = f'{{ addr = "127.0.0.1:{stunnel_redis}", tls = true, ca = "{pki / "ca.pem"}", server_name = "localhost" }}'
    producer = names.producer("redis-tls")
    quota = f"""
[[quota]]
name = "flood"
match = {{ producer = "{producer}" }}
messages = "1/min"
burst = 3
on_exceed = {{ shed = "too fast" }}
"""
    s = sluice(
        f'[listener.tls]\ncert = "{pki / "server.pem"}"\nkey = "{pki / "server.key"}"\n{quota}',
        redis=True,
        redis_upstream=upstream,
    )
    key = names.queue("redis-tls")
    direct = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    c = redis.Redis(
        host="localhost",
        port=s.redis_port,
        ssl=True,
        ssl_ca_certs=str(pki / "ca.pem"),
        client_name=producer,
        socket_timeout=10,
    )
    try:
        results = []
        for i in range(5):
            try:
                results.append(c.rpush(key, i))
            except redis.exceptions.ResponseError as e:
                results.append(str(e))
        assert results[:3] == [1, 2, 3]
        assert all("SLUICE shed: too fast" in r for r in results[3:]), results
        assert direct.lrange(key, 0, -1) == [b"0", b"1", b"2"]
        # A plain client on the TLS listener gets nothing it could take for a reply.
        plain = redis.Redis(host="127.0.0.1", port=s.redis_port, socket_timeout=5)
        with pytest.raises(redis.exceptions.ConnectionError):
            plain.ping()
    finally:
        c.close()
        direct.delete(key)
        direct.close()
