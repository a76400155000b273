#!/usr/bin/env python3
"""How much must a proxy read from a paced client so that Linux does not abort the client's socket?

A sender with ``TCP_USER_TIMEOUT`` (py-amqp, Celery's AMQP client, sets 1000 ms) writes 2,200-byte
messages as fast as it can over loopback; the receiver reads ``CHUNK`` bytes every ``INTERVAL``
seconds and nothing in between. Linux aborts the sender's socket (``ETIMEDOUT``) once the
receiver's window has stayed shut for longer than the user timeout, even though every
zero-window probe is answered. This is why sluice reads paced connections ahead
(``[limits] max_read_ahead``, 128 KiB every 200 ms).

    benches/drill/zero_window.py                       # the default grid, 2 trials each
    benches/drill/zero_window.py 131072 0.25 10        # one trial: chunk bytes, interval s, seconds

Seen on this project's 2-core VM (kernel 6.18): nothing, or 16 KiB every 250 ms: aborted after
~1.5 s, every time; 128 KiB every 250 ms: never aborted; 64-96 KiB every 400 ms or 256 KiB every
800 ms: aborted in some trials (after 4-8 s), not in others.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

MESSAGE = b"x" * 2200


def trial(chunk: int, interval: float, seconds: float, user_timeout_ms: int = 1000) -> str:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    outcome: dict[str, object] = {}

    def send() -> None:
        c = socket.create_connection(("127.0.0.1", port))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
        start, sent = time.monotonic(), 0
        try:
            while time.monotonic() - start < seconds:
                c.sendall(MESSAGE)
                sent += len(MESSAGE)
            outcome["ok"] = sent
        except OSError as e:
            outcome["error"] = (e.__class__.__name__, round(time.monotonic() - start, 1), sent)
        finally:
            c.close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    conn, _ = srv.accept()
    conn.setblocking(False)
    start, read = time.monotonic(), 0
    try:
        while not outcome:
            time.sleep(interval)
            # Past the trial's end the sender stops writing: drain it so its last write returns.
            want = chunk if time.monotonic() - start < seconds else 1 << 30
            while want > 0:
                try:
                    got = conn.recv(min(65536, want))
                except BlockingIOError:
                    break
                if not got:
                    break
                want -= len(got)
                read += len(got)
    except OSError:
        pass  # the sender's socket was aborted: its reset arrives here
    sender.join(timeout=5)
    conn.close()
    srv.close()
    if "error" in outcome:
        kind, at, sent = outcome["error"]  # type: ignore[misc]
        return f"ABORTED ({kind}) after {at} s, {sent:,} B written, {read:,} B read"
    return f"alive for {seconds:.0f} s, {read:,} B read"


def main() -> None:
    if len(sys.argv) == 4:
        chunk, interval, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
        print(f"{chunk // 1024} KiB every {interval * 1000:.0f} ms: {trial(chunk, interval, seconds)}")
        return
    for interval in (0.25, 0.4):
        for chunk in (0, 16 << 10, 64 << 10, 128 << 10):
            for _ in range(2):
                print(f"{chunk // 1024:>4} KiB every {interval * 1000:.0f} ms: {trial(chunk, interval, 8)}")


if __name__ == "__main__":
    main()
