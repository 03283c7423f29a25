"""How many replicas the gateway finds behind a backend's target: the lane slots of the dense hop
scale with them."""

import asyncio
import socket

import pytest

from gateway import backends
from gateway.backends import Backend, dns_host_port, listed_replicas, resolve_replicas


@pytest.mark.parametrize(
    ("target", "count"),
    [
        ("ipv4:127.0.0.1:50061,127.0.0.1:50062,127.0.0.1:50063", 3),
        ("ipv4:127.0.0.1:50061", 1),
        ("ipv6:[::1]:50061,[::1]:50062", 2),
        ("unix:/run/maas/dense.sock", 1),
        ("dns:///maas-dense:50061", None),
        ("maas-dense:50061", None),
    ],
)
def test_a_target_that_lists_its_addresses_counts_them_and_a_name_is_left_to_dns(target, count):
    assert listed_replicas(target) == count


@pytest.mark.parametrize(
    ("target", "host_port"),
    [
        ("dns:///maas-dense:50061", ("maas-dense", "50061")),
        ("dns://10.0.0.10:53/maas-dense.maas.svc:50061", ("maas-dense.maas.svc", "50061")),
        ("dns:maas-dense:50061", ("maas-dense", "50061")),
        ("127.0.0.1:50061", ("127.0.0.1", "50061")),
        ("[::1]:50061", ("::1", "50061")),
        ("maas-dense", ("maas-dense", "443")),
    ],
)
def test_a_dns_target_names_its_host_and_port(target, host_port):
    assert dns_host_port(target) == host_port


async def test_a_name_counts_the_distinct_addresses_dns_gives():
    assert await resolve_replicas("127.0.0.1:50061") == 1
    assert await resolve_replicas("dns:///127.0.0.1:50061") == 1
    addresses = {a[4][0] for a in socket.getaddrinfo("localhost", 50061, type=socket.SOCK_STREAM)}
    assert await resolve_replicas("localhost:50061") == len(addresses)


async def test_a_name_dns_cannot_resolve_is_a_clear_error_and_the_backend_keeps_its_count():
    with pytest.raises(ValueError, match="cannot resolve 'dns:///no-such-host.invalid:50061'"):
        await resolve_replicas("dns:///no-such-host.invalid:50061")
    backend = Backend("dense", "maas.dense.v1.DenseService", "dns:///no-such-host.invalid:50061", 1 << 20)
    try:
        assert backend.replica_count() == 1  # until a look-up succeeds
        await backend._resolving
        assert backend.replica_count() == 1
    finally:
        await backend.close()


async def test_a_listed_target_is_never_looked_up():
    backend = Backend("dense", "maas.dense.v1.DenseService", "ipv4:127.0.0.1:1,127.0.0.1:2", 1 << 20)
    try:
        assert backend.replica_count() == 2
        assert backend._resolving is None
    finally:
        await backend.close()


async def test_a_look_up_that_hangs_is_not_started_again_and_its_answer_counts_once_it_comes(monkeypatch):
    answer = asyncio.Event()
    started = []

    async def slow_dns(target):  # a resolver that takes its time, as a sick one does
        started.append(target)
        await answer.wait()
        return 3

    monkeypatch.setattr(backends, "resolve_replicas", slow_dns)
    backend = Backend("dense", "maas.dense.v1.DenseService", "dns:///maas-dense:50061", 1 << 20)
    try:
        assert backend.replica_count() == 1
        await asyncio.sleep(0)
        backend._resolve_at = 0.0  # the look-up is overdue again while the first still hangs
        assert backend.replica_count() == 1
        await asyncio.sleep(0)
        assert len(started) == 1
        answer.set()
        await backend._resolving
        assert backend.replica_count() == 3
    finally:
        await backend.close()
