"""Slow and idle clients: hundreds of them delay nobody, and they are cut off in time."""

from __future__ import annotations

import socket
import time

import pytest

from ..e2e_support import LOOPBACK_V4, Server, ServerPool

STALLERS = 800
CLIENT_TIMEOUT = 4.0


@pytest.fixture(autouse=True)
def enough_file_descriptors() -> None:
    """800 stalled sockets here and 800 in the server (which inherits this limit)."""
    import resource  # POSIX only, like the rest of this slow module; imported here so that

    # collecting it (to deselect it) works everywhere
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def open_stallers(server: Server) -> list[socket.socket]:
    """Half never send a byte; half send part of a request and stop."""
    stallers = []
    for number in range(STALLERS):
        connection = socket.create_connection((LOOPBACK_V4, server.port), timeout=5)
        if number % 2:
            connection.sendall(b"POST /set HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        stallers.append(connection)
    return stallers


def closed_by_server(connection: socket.socket) -> bool:
    connection.settimeout(0.05)
    try:
        return connection.recv(1024) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_stalled_clients_delay_nobody_and_are_closed(servers: ServerPool) -> None:
    server = servers.start(env={"KV_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT)})
    stallers = open_stallers(server)
    try:
        started = time.monotonic()
        answer = server.request("POST", "/set", b'{"key": "k", "val": "v"}')
        assert answer.status == 200
        assert server.request("GET", "/get/k").json() == {"key": "k", "val": "v"}
        # Milliseconds here; the bound leaves a loaded machine room, and is half the
        # deadline the stallers would hold a request up to if they could.
        assert time.monotonic() - started < CLIENT_TIMEOUT / 2
        assert not any(closed_by_server(connection) for connection in stallers[-20:])

        time.sleep(CLIENT_TIMEOUT * 1.25 + 0.5)  # the deadline, the sweep interval, slack
        still_open = [c for c in stallers if not closed_by_server(c)]
        assert not still_open, f"{len(still_open)} of {STALLERS} stalled connections open"
        assert server.request("GET", "/get/k").status == 200
    finally:
        for connection in stallers:
            connection.close()
    assert server.stop() == 0


def test_a_client_that_trickles_within_the_deadline_is_served(servers: ServerPool) -> None:
    server = servers.start(env={"KV_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT)})
    request = b'POST /set HTTP/1.1\r\nHost: x\r\nContent-Length: 24\r\n\r\n{"key": "k", "val": "v"}'
    with socket.create_connection((LOOPBACK_V4, server.port), timeout=5) as connection:
        for start in range(0, len(request), 8):
            connection.sendall(request[start : start + 8])
            time.sleep(0.02)
        assert connection.recv(1024).startswith(b"HTTP/1.1 200")
    assert server.stop() == 0
