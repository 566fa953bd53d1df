"""Checkpoints: the model through ``megatron.core.dist_checkpointing`` (reloadable at any TP size), plus the
per-rank training state (optimizer, scheduler, RNG, data position) for an exact resume.

Layout of a checkpoint directory::

    meta.json            {"format", "step", "model": ModelSettings, "vocab_size", "padded_vocab_size",
                          "tp", "dp", ...caller's extra keys}; written last: its presence marks completeness
    model/               dist_checkpointing (torch_dist) files of ``model.sharded_state_dict()``
    tokenizer.json       the student tokenizer, when one was given (a checkpoint is self-contained)
    train_state/rank_00000.pt ...   one file per global rank; only a same-grid resume reads them

The model weights are float32 and the optimizer state is torch ``AdamW``'s format whichever optimizer path
wrote them (``student.optim``: bf16 parameters are saved as their float32 main weights, the distributed
optimizer's shards gathered), so a checkpoint made on a GPU resumes on a CPU and the other way round.

Public API (stable; every function is collective: call it on all ranks of the job):

- ``save_checkpoint(directory, model, settings, step, train_states=None, tokenizer=None, extra=None)``:
  writes into ``<directory>.tmp`` and renames it into place once all ranks finished, so a crash never leaves a
  half-written checkpoint under ``directory``. ``train_states`` is this rank's picklable dict (or None).
- ``load_checkpoint(directory) -> (GPTModel, meta)``: builds the model at the *current* TP size (keeping the
  saved vocabulary padding) and loads its weights. Needs ``init_distributed`` first.
- ``load_model_weights(model, directory)``: load into an existing model.
- ``read_meta(directory) -> dict``; ``load_train_state(directory) -> dict`` (this rank's; refuses another grid).
- ``latest_checkpoint(root) -> Path | None``: the newest complete ``step_*`` directory under ``root``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.models.gpt import GPTModel

from student.model import build_model
from student.settings import ModelSettings

FORMAT = 1
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or made for another setup; the message says which."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _save_strategy() -> TorchDistSaveShardedStrategy:
    """torch_dist format, one file per rank, written synchronously.

    The writer hands its results back through a module-level queue that megatron creates as a
    ``multiprocessing`` Manager: a spawned server process that re-imports ``__main__`` (seconds of CPU per rank,
    and import side effects in the trainer's module). A synchronous save puts and gets that queue in this same
    process, so an in-process queue is equivalent.
    """
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)


def save_checkpoint(
    directory: str | Path,
    model: GPTModel,
    settings: ModelSettings,
    step: int,
    train_states: dict[str, Any] | None = None,
    tokenizer: str | Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        (tmp / "train_state").mkdir()
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"), sharded_strategy=_save_strategy())
    if train_states is not None:
        torch.save(train_states, tmp / "train_state" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        meta = {
            "format": FORMAT,
            "step": step,
            "model": settings.model_dump(),
            "vocab_size": model.true_vocab_size,
            "padded_vocab_size": model.padded_vocab_size,
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "has_train_state": train_states is not None,
            **(extra or {}),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    _barrier()
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a complete checkpoint (no {META})")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def load_model_weights(model: GPTModel, directory: str | Path) -> None:
    directory = Path(directory)
    read_meta(directory)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(directory / "model"))
    model.load_state_dict(state)


def load_checkpoint(directory: str | Path) -> tuple[GPTModel, dict[str, Any]]:
    meta = read_meta(directory)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded = meta["padded_vocab_size"]
    if padded % tp:
        raise CheckpointError(
            f"{directory}: its padded vocabulary ({padded}) does not split into TP={tp} equal slices"
        )
    model = build_model(ModelSettings(**meta["model"]), meta["vocab_size"], padded_vocab=padded)
    load_model_weights(model, directory)
    return model, meta


def load_train_state(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    meta = read_meta(directory)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    if (meta["tp"], meta["dp"]) != (tp, dp):
        raise CheckpointError(
            f"{directory}: training state was saved at TP={meta['tp']} x DP={meta['dp']}; resuming it needs "
            f"the same grid (got TP={tp} x DP={dp}); load only the weights to change it"
        )
    path = directory / "train_state" / f"rank_{_rank():05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing training state of rank {_rank()}")
    return torch.load(path, map_location="cpu", weights_only=False)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete ``step_<n>`` directory with the largest n under ``root`` (``*.tmp`` ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [
        (int(p.name.split("_", 1)[1]), p)
        for p in root.glob("step_*")
        if p.name.split("_", 1)[1].isdigit() and (p / META).is_file()
    ]
    return max(steps)[1] if steps else None
