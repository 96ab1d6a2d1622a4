"""Growing a network trained with ``torch.distributed`` (DistributedDataParallel).

Every rank holds a replica of the network, and growth must keep the replicas identical: each rank
runs the same operation on its own replica, drawing the unit mapping from a generator seeded the
same everywhere (:func:`shared_generator`). DistributedDataParallel registers its parameters when
it is built, so after growth the wrapper is rebuilt around the grown module (:func:`grow_ddp`),
and :func:`check_replicas` proves that every parameter and buffer is still the same on all ranks.

Example (on every rank, between two optimizer steps)::

    g = shared_generator(seed=0)                     # rank 0's seed, broadcast
    ddp, rec = grow_ddp(ddp, lambda net: net.widen("fc1", factor=2, generator=g), optimizer=opt)
    ddp, rec = grow_ddp(ddp, lambda net: net.deepen("fc1"), optimizer=opt)

Collectives run on the devices the process group's backend supports: on CUDA tensors with NCCL
(nothing goes through the host), on the CPU with Gloo; :func:`control_device` and
:func:`global_rank` serve code that makes collectives of its own next to these.

Modules: ``collectives`` (devices, flat buckets, :func:`shared_generator`), ``replicas``
(:func:`check_replicas`), ``ddp`` (:func:`grow_ddp`).
"""

from .collectives import control_device, global_rank, shared_generator
from .ddp import GrowthOp, grow_ddp
from .replicas import ReplicaReport, check_replicas

__all__ = [
    "GrowthOp",
    "ReplicaReport",
    "check_replicas",
    "control_device",
    "global_rank",
    "grow_ddp",
    "shared_generator",
]
