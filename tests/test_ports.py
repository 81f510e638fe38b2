"""The test servers' ports (``tests.objectstore.free_port``): never in the kernel's ephemeral range, where an
outgoing connection can take a port between the probe and the server's bind (a CI run lost a SeaweedFS start
that way), never in Ray's worker-port range, and disjoint between pytest-xdist workers."""

from __future__ import annotations

import socket

from tests import objectstore


def test_ports_are_outside_the_ephemeral_and_ray_ranges_and_bindable():
    ephemeral = objectstore._ephemeral_ports()
    ports = [objectstore.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    for port in ports:
        assert port not in ephemeral and port not in objectstore._RAY_WORKER_PORTS and port >= objectstore._LOWEST
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))  # still free: a probe is released before the port is handed out


def test_two_xdist_workers_draw_from_disjoint_shares(monkeypatch):
    shares = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
        shares.append(set(objectstore._port_pool()))
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT")
    assert set(objectstore._port_pool()) == shares[0] | shares[1]  # one process alone has them all


def test_a_port_taken_by_a_listener_is_not_handed_out(monkeypatch):
    pool = objectstore._port_pool()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", pool[0]))
        taken.listen()
        monkeypatch.setattr(objectstore, "_port_pool", lambda: pool[:2])
        monkeypatch.setattr(objectstore, "_HANDED_OUT", set())
        assert objectstore.free_port() == pool[1]
