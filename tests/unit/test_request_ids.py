"""Request ids made by the servers: unique, in one process and across processes, and shaped as before."""

from __future__ import annotations

import multiprocessing
import os
import re

from shared.observability import new_request_id


def _ids(count: int) -> list[str]:
    return [new_request_id() for _ in range(count)]


def test_request_ids_are_32_hex_digits_and_never_repeat_in_a_process() -> None:
    ids = _ids(10_000)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def _process_and_ids(count: int) -> tuple[int, list[str]]:
    return os.getpid(), _ids(count)


def test_processes_started_from_one_parent_make_different_ids() -> None:
    parent = _ids(100)
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(2) as pool:
            # One task per worker is not promised: a worker may run both, and then shares its prefix.
            children = pool.map(_process_and_ids, [100, 100], chunksize=1)
        prefixes = {pid: ids[0][:16] for pid, ids in children}
        assert parent[0][:16] not in prefixes.values(), method
        assert len(set(prefixes.values())) == len(prefixes), method  # one prefix per process
        assert len({*parent, *children[0][1], *children[1][1]}) == 300, method
