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
