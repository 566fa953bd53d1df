"""Process groups for a TP x DP grid: torch.distributed + megatron-core parallel state, seeding, teardown.

Public API (stable):

- ``init_distributed(tp=1, dp=None, timeout_s=600) -> DistEnv``: under torchrun reads RANK / WORLD_SIZE /
  LOCAL_RANK; a plain ``python`` process (no torchrun) becomes a world of one on a free local port, so a
  single-process server or notebook can load a checkpoint the same way. Gloo on CPU (with the
  ``student.compat`` shims), NCCL on GPU (one device per local rank). ``dp`` defaults to world / tp; a grid
  that does not tile the world is a clear error. Then ``parallel_state.initialize_model_parallel(tp)``.
- ``seed_everything(seed)``: Python, NumPy and torch generators identical on every rank (so CPU-initialised
  weights are identical before megatron slices them: TP=2 equals TP=1), plus megatron's model-parallel RNG
  tracker (per-TP-rank dropout streams inside tensor-parallel regions).
- ``teardown()``: destroys megatron's parallel state and the process group (safe to call twice).
- ``distributed(tp, dp) -> ContextManager[DistEnv]``: the two above around a block.
- ``rng_state() -> dict`` / ``set_rng_state(dict)``: every generator of this rank, for exact resume. A state
  saved on the other kind of device (GPU <-> CPU) restores the Python, NumPy and CPU torch generators and keeps
  the freshly seeded CUDA / model-parallel tracker streams: a CUDA generator state is not a CPU one.
- ``tp_group()``, ``dp_group()``: megatron's tensor- and data-parallel process groups.

Rank layout is megatron's: TP ranks are adjacent (rank = dp_rank * tp + tp_rank), so a TP group never
crosses a node when TP divides the GPUs per node.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import random as mcore_random

from student import compat


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env() -> tuple[int, int, int]:
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(tp: int = 1, dp: int | None = None, timeout_s: float = 600) -> DistEnv:
    """Join (or create) the process group and build megatron's TP x DP grid; see the module docstring."""
    rank, world, local_rank = _launch_env()
    if dp is None:
        dp = world // tp
    if tp * dp != world:
        raise ValueError(
            f"tensor_parallel ({tp}) x data_parallel ({dp}) = {tp * dp} processes, but the launcher started "
            f"{world} (torchrun --nproc-per-node x --nnodes must equal TP x DP)"
        )
    cuda = torch.cuda.is_available()
    compat.install()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        tp=tp,
        dp=dp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    compat.install()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def tp_group() -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


def dp_group() -> dist.ProcessGroup:
    return parallel_state.get_data_parallel_group()


def rng_state() -> dict[str, Any]:
    """Every generator this rank draws from, as plain picklable objects."""
    tracker = mcore_random.get_cuda_rng_tracker()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {name: state.clone() for name, state in tracker.get_states().items()},
        "tracker_device": _tracker_device(),
    }


def _tracker_device() -> str:
    """Whose generator states the model-parallel tracker holds: CPU ones under the ``compat`` shims."""
    return "cpu" if compat.on_cpu() else "cuda"


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker_device", _tracker_device()) == _tracker_device():  # older states: same device
        mcore_random.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def teardown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(tp: int = 1, dp: int | None = None, seed: int | None = None) -> Iterator[DistEnv]:
    """``init_distributed`` (and ``seed_everything`` when a seed is given) around a block, then teardown."""
    try:
        env = init_distributed(tp, dp)
        if seed is not None:
            seed_everything(seed)
        yield env
    finally:
        teardown()
