"""Where the training loop runs: in-process, or as one rank of a Ray Train worker group.

The loop is written once against ``Runtime``: rank, world size, device, how to wrap
the model, and how to gather evaluation results from every rank. ``local_runtime``
serves ``tunecv train`` and in-process search trials (no worker group, so no ~20 s
start-up per trial); ``ray_train_runtime`` serves TorchTrainer workers, where Ray has
already initialised the process group (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Runtime:
    """The process's place in the (possibly one-process) training job."""

    rank: int
    world_size: int
    device: torch.device
    use_ray_train: bool = False
    cpus: float = 1.0  # the CPUs this process may use: Ray's assignment, else its affinity

    @property
    def is_chief(self) -> bool:
        """Rank 0 alone writes checkpoints and files."""
        return self.rank == 0

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to the device; wrap in DDP when there is more than one rank."""
        if self.use_ray_train:
            import ray.train.torch

            # Ray skips the DDP wrapper itself when world_size == 1.
            return ray.train.torch.prepare_model(model, move_to_device=self.device)
        return model.to(self.device)

    def average_buffers(self, model: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running stats) over all ranks.

        DDP trains with identical weights but each rank updates its running stats on
        its own batches; without this, rank 1 would evaluate its validation shard with
        other statistics than the checkpoint that rank 0 saves.
        """
        if self.world_size == 1:
            return
        for buffer in model.buffers():
            if buffer.is_floating_point():
                torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
                buffer.div_(self.world_size)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a one-element list in-process)."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered


def local_runtime(use_gpu: bool) -> Runtime:
    """A single in-process runtime on CUDA when asked for and present, else CPU.

    Raises:
        RuntimeError: ``use_gpu`` is true but CUDA is not available.
    """
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError(
            "scaling.use_gpu is true but this machine has no CUDA device; set "
            "scaling.use_gpu: false to train on the CPU."
        )
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    return Runtime(rank=0, world_size=1, device=device, cpus=assigned_cpus())


def ray_train_runtime() -> Runtime:
    """The runtime of the current Ray Train worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return Runtime(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        use_ray_train=True,
        cpus=assigned_cpus(),
    )


def assigned_cpus() -> float:
    """The CPUs Ray assigned to this process (a trial actor, a Ray Train worker), or, outside
    Ray, the ones the OS lets it run on."""
    import os

    try:
        import ray

        # Only an actor (a trial, a Ray Train worker) has an assignment: a driver that
        # started Ray (the export at a search's end) has none, and Ray asserts on it.
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return float(cpus)
    except ImportError:
        pass
    return float(len(os.sched_getaffinity(0)))
