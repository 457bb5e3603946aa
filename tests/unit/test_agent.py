"""The agent's JSON-lines protocol, guest side and host side talking over a socketpair (no VM)."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from suite.errors import StallError
from suite.targets.agent import AgentClient, AgentError, serve_fd


@pytest.fixture
def agent():
    host, guest = socket.socketpair()
    fd = os.dup(guest.fileno())
    guest.close()
    thread = threading.Thread(target=serve_fd, args=(fd,), daemon=True)
    thread.start()
    client = AgentClient(host)
    yield client, thread
    client.close()
    thread.join(timeout=5)
    os.close(fd)


def test_hello_and_requests(agent) -> None:
    client, thread = agent
    hello = client.hello(timeout=30)
    assert hello["hello"] == os.uname().release and hello["agent_startup"] >= 0
    assert client.call("uname", timeout=30)["release"] == os.uname().release
    assert client.call("ping", timeout=30)["pong"] > 0
    with pytest.raises(AgentError, match="unknown method 'frobnicate'"):
        client.call("frobnicate", timeout=30)
    assert client.call("shutdown", timeout=30)["ok"] is True
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_bad_scenario_is_one_line_error(agent) -> None:
    client, _ = agent
    client.hello(timeout=30)
    with pytest.raises(AgentError) as err:
        client.call("run", timeout=60, scenario='{"name": "x"}', options={})
    assert str(err.value).startswith("in the guest: ") and "\n" not in str(err.value)


def test_waits_are_bounded_and_say_what_was_awaited() -> None:
    host, guest = socket.socketpair()
    try:
        t0 = time.monotonic()
        with pytest.raises(StallError, match=r"waiting for the agent's hello.*last seen: nothing yet"):
            AgentClient(host).hello(timeout=0.3)
        assert time.monotonic() - t0 < 2
        guest.close()
        closed = r"cannot send 'ping'|channel closed while waiting for the agent's reply to 'ping'"
        with pytest.raises(AgentError, match=closed):
            AgentClient(host).call("ping", timeout=5)
    finally:
        host.close()


def test_watch_turns_a_dead_guest_into_an_immediate_error() -> None:
    host, guest = socket.socketpair()
    try:
        client = AgentClient(host, watch=lambda: "Kernel panic - not syncing: test")
        t0 = time.monotonic()
        with pytest.raises(AgentError, match="Kernel panic"):
            client.hello(timeout=30)
        assert time.monotonic() - t0 < 2
    finally:
        host.close()
        guest.close()


@pytest.mark.parametrize(("line", "fatal"), [
    ("holecheck-init: [5.06] FAILED: mount -t virtiofs hostroot /newroot", True),
    ("holecheck-init: [12.85] agent exited with status 1", True),
    ("[    1.531525] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)", True),
    ("holecheck-init: [4.43] starting the agent", False),
    ("[    2.5] Run /init as init process", False),
])
def test_console_lines_that_end_a_boot(line: str, fatal: bool) -> None:
    from suite.targets.vm import FATAL_RE

    assert bool(FATAL_RE.search(line)) == fatal
