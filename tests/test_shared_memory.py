"""Shared memory: the parameters sit in /dev/shm twice (the averager's input and output), not four times.

Docker gives a container 64 MB of /dev/shm by default: every shared copy of the parameters counts
against it (docker/docker-compose.yml sets shm_size; the README says how much each preset needs).
The worker-level check (a real worker's /dev/shm mappings) is in tests/test_clock.py, which starts
workers anyway.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import hivemind
import pytest
import torch
from hivemind.utils import get_dht_time

from averaging import SwarmAverager
from averaging.outer import OuterOptimizer

SHAPES = [(300, 200), (5000,), (1,)]
FAST = dict(matchmaking_time=2.0, request_timeout=1.0, next_chunk_timeout=2.0, allreduce_timeout=20.0)


@pytest.fixture(scope="module")
def two_dhts() -> Iterator[list[hivemind.DHT]]:
    nodes = [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    try:
        nodes.append(hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                  initial_peers=nodes[0].get_visible_maddrs()))
        yield nodes
    finally:
        for node in nodes:
            node.shutdown()


def shared_storages(tensors: list[torch.Tensor]) -> set[int]:
    """The distinct shared-memory storages behind `tensors` (by address)."""
    return {t.untyped_storage().data_ptr() for t in tensors if t.is_shared()}


Pair = tuple[SwarmAverager, OuterOptimizer, list[torch.Tensor]]


def pair(dht: hivemind.DHT, run_id: str, seed: int) -> Pair:
    """An averager and an outer optimizer wired as the worker wires them; and the local params."""
    # The same theta_g on every peer (as in a swarm), each its own local params.
    theta = [torch.randn(shape, generator=torch.Generator().manual_seed(0)) for shape in SHAPES]
    generator = torch.Generator().manual_seed(1 + seed)
    outer = OuterOptimizer(theta, lr=0.7, momentum=0.9, nesterov=True)
    averager = SwarmAverager(dht=dht, run_id=run_id, template=outer.params, target_group_size=2, **FAST)
    averager.start()
    outer.use_delta(averager.input_tensors(), writing=averager.writing_input)
    local = [p + torch.randn(p.shape, generator=generator) * 0.1 for p in theta]
    return averager, outer, local


def test_delta_is_the_averagers_input_and_theta_g_is_not_shared(two_dhts: list[hivemind.DHT]) -> None:
    run_id = f"shm-{uuid.uuid4().hex[:8]}"
    pairs = [pair(dht, run_id, seed) for seed, dht in enumerate(two_dhts)]
    try:
        for _, outer, local in pairs:
            outer.compute_pseudo_gradient(local)
        deltas = [[d.clone() for d in outer.delta] for _, outer, _ in pairs]

        # A lone round fails: delta (the input buffer itself) is exactly what it was.
        averager, outer, _ = pairs[0]
        alone = averager.average(outer.delta, weight=1.0, epoch=0, deadline=get_dht_time() + 1.0)
        assert alone.group_size == 1
        assert all(torch.equal(d, e) for d, e in zip(outer.delta, deltas[0], strict=True))

        # Both average: the result lands in delta, and both step from it to the same theta_g.
        deadline = get_dht_time() + 20
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(a.average, o.delta, weight=1.0, epoch=1, deadline=deadline)
                       for a, o, _ in pairs]
            results = [f.result(timeout=30) for f in futures]
        assert [r.group_size for r in results] == [2, 2], [r.failures for r in results]
        for _, outer, _ in pairs:
            expected = [(a + b) / 2 for a, b in zip(*deltas, strict=True)]
            assert all(torch.allclose(d, e, atol=1e-6) for d, e in zip(outer.delta, expected, strict=True))
            outer.step()
        assert all(torch.equal(a, b) for a, b in zip(pairs[0][1].params, pairs[1][1].params, strict=True))

        for averager, outer, _ in pairs:
            everything = [*outer.params, *outer.delta, *outer.state_tensors().values(),
                          averager._input, averager._output]
            assert len(outer.state_tensors()) == len(SHAPES)  # the momentum exists, in ordinary memory
            # Exactly two shared parameter-sized buffers: the averager's input (which delta is) and output.
            assert shared_storages(everything) == {averager._input.untyped_storage().data_ptr(),
                                                   averager._output.untyped_storage().data_ptr()}
            assert shared_storages(outer.delta) == {averager._input.untyped_storage().data_ptr()}
            assert all(p.grad.data_ptr() == d.data_ptr()
                       for p, d in zip(outer.params, outer.delta, strict=True))
    finally:
        for averager, _, _ in pairs:
            averager.shutdown()
