"""DistributedDataParallel (gloo, 2 processes started with torch.multiprocessing.spawn): the
gradients equal those of one process on the same batch, in float64 to 1e-12.

The README's launch command (torchrun with examples/ddp.py) is run by
tests/test_examples_other.py::test_ddp_example_under_torchrun.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD_SIZE = 2
BATCH = 8  # global; each process gets BATCH / WORLD_SIZE samples
T = 2.0


def _network() -> nn.Sequential:
    from spike_bridge.nn import FirstSpikeTime, LatencyEncoder, ThetaLinear

    torch.manual_seed(0)
    net = nn.Sequential(
        LatencyEncoder(T=T), ThetaLinear(12, 8, w_scale=4.0), ThetaLinear(8, 4, w_scale=4.0),
        FirstSpikeTime(),
    ).double()
    return net


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(BATCH, 12, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (BATCH,), generator=generator)
    return features, labels


def _gradients(net: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    from spike_bridge.functional import first_spike_cross_entropy

    loss = first_spike_cross_entropy(net(features), labels, T=T)
    loss.backward()
    return [p.grad.detach().clone() for p in net.parameters()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        net = nn.parallel.DistributedDataParallel(_network())
        features, labels = _batch()
        shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        grads = _gradients(net, features[shard], labels[shard])  # averaged over processes
        torch.save(grads, os.path.join(out_dir, f"grads_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_one_process_on_the_same_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    single = _gradients(_network(), *_batch())
    assert all(g.abs().max() > 0 for g in single)
    for rank in range(WORLD_SIZE):
        ddp = torch.load(tmp_path / f"grads_{rank}.pt")
        assert len(ddp) == len(single)
        for ddp_grad, grad in zip(ddp, single):
            assert ddp_grad.dtype == torch.float64
            torch.testing.assert_close(ddp_grad, grad, rtol=0, atol=1e-12)
