"""The tensor-parallel context of a vocab-parallel loss: group, rank, this rank's vocabulary slice, all-reduces.

See docs/losses.md, "Tensor-parallel decomposition". Every collective here reduces a tensor whose size is the
number of tokens (times a small constant), never the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.utils import VocabUtility


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice ``[start, end)`` of the vocabulary and the group that holds the other slices.

    ``group`` is None in a single process without torch.distributed (TP=1): the all-reduces are then no-ops.
    """

    start: int
    end: int
    group: dist.ProcessGroup | None

    def all_reduce(
        self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
    ) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def local_index(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Column of each global id in this shard (0 where not held here) and whether this rank holds it.

        Negative ids (padding) are held by no rank.
        """
        held = (ids >= self.start) & (ids < self.end)
        return torch.where(held, ids - self.start, torch.zeros_like(ids)), held


def vocab_shard(partition_vocab_size: int) -> VocabShard:
    """The megatron-core tensor-parallel group and this rank's vocabulary range.

    Without torch.distributed (a single process) the loss runs at TP=1. With torch.distributed initialized but
    megatron-core's model parallel state not, the layout of the vocabulary is unknown: refuse rather than
    silently compute a loss over one shard.
    """
    if parallel_state.model_parallel_is_initialized():
        rank = parallel_state.get_tensor_model_parallel_rank()
        world = parallel_state.get_tensor_model_parallel_world_size()
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(partition_vocab_size, rank, world)
        group = parallel_state.get_tensor_model_parallel_group() if world > 1 else None
        return VocabShard(start, end, group)
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError(
            "vocab-parallel loss: torch.distributed is initialized but megatron-core's model parallel state is "
            "not; call megatron.core.parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP) "
            "first so the loss knows which vocabulary slice this rank holds"
        )
    return VocabShard(0, partition_vocab_size, None)
