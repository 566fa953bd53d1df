"""CPU support for megatron-core: the few CUDA calls it makes unconditionally, answered on the CPU.

Public API (stable):

- ``install() -> bool``: idempotent; when CUDA is available it does nothing and returns False. Otherwise it
  (1) makes ``torch.cuda.current_device()`` answer the CPU device (megatron allocates its attention scratch
  buffer and RoPE frequencies "on the current device"), (2) makes ``torch.cuda.synchronize()`` a no-op
  (``dist_checkpointing`` calls it around saves), and (3) installs ``CpuRNGStatesTracker`` as megatron's
  model-parallel RNG tracker, which attention forks on every forward even without dropout.
- ``on_cpu() -> bool``: whether the CPU shims are in force.
- ``CpuRNGStatesTracker``: megatron's tracker keeping CPU generator states (``torch.get_rng_state``) instead
  of CUDA ones, so dropout inside tensor-parallel regions is seeded per TP rank exactly as on GPU.

Everything else (CPU weight initialisation, explicit attention masks, no fusions) is a model setting, not a
patch: see ``student.model``. The notes in ``shared/notes/megatron-cpu.md`` record what was seen to work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.tensor_parallel import random as mcore_random

_installed = False


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron's ``CudaRNGStatesTracker`` with the CPU default generator in place of the CUDA one."""

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"rng seed {seed} already tracked")
        if name in self.states_:
            raise ValueError(f"rng state {name!r} already tracked")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise ValueError(f"rng state {name!r} was never added (seed the tracker first)")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _no_sync(device: object = None) -> None:
    return None


def on_cpu() -> bool:
    return _installed


def install() -> bool:
    """Install the CPU shims unless CUDA is present; returns whether they are in force."""
    global _installed
    if torch.cuda.is_available():
        return False
    if not _installed:
        torch.cuda.current_device = _cpu_device
        torch.cuda.synchronize = _no_sync
        _installed = True
    if not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return True
