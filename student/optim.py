"""The optimizer side of a training step: data-parallel gradient reduction, clipping, AdamW, the learning-rate
schedule, and a checkpoint state that either path writes and reads.

Public API (stable; call after ``student.distributed.init_distributed``):

- ``resolve_precision(settings, cuda) -> "bf16" | "fp32"``: ``train.precision`` with ``auto`` decided.
- ``make_train_optimizer(model, settings, env) -> TrainOptimizer``: wraps the (float32, weights loaded) model.
- ``TrainOptimizer``: ``zero_grad()``; ``backward_context(last)`` around each micro-batch's backward (gradient
  reduction waits for the last one); ``step(grad_scale) -> (grad_norm, lr)``; ``state_dict()`` /
  ``load_state_dict(state)`` (keys ``optimizer`` and ``scheduler``); ``float32_weights()``: a context in which
  the model's parameters hold the full float32 weights, for ``student.checkpoint.save_checkpoint``.

Both paths use megatron-core's ``DistributedDataParallel``: gradients accumulate in a float32 buffer, reduced over
the data-parallel group in buckets (launched as soon as a bucket's gradients are ready in the last micro-batch's
backward, overlapping the rest of it), summed rather than averaged (``calculate_per_token_loss``: the step's
loss is a token sum, ``grad_scale`` = 1 / global tokens turns it into the global token mean).

- CUDA: megatron-core's distributed optimizer (AdamW state and float32 main weights sharded over DP ranks),
  parameters in bf16 (``precision = "bf16"``) or float32.
- CPU (gloo): torch AdamW and the hand-written clipping below, float32 only. megatron-core 0.16.1's optimizers do
  not run without CUDA: ``FP32Optimizer.__init__`` allocates ``torch.tensor([1.0], device='cuda')``
  ("AssertionError: Torch not compiled with CUDA enabled"), ``MixedPrecisionOptimizer`` (behind the distributed
  optimizer) does the same for ``_dummy_overflow_buf`` / ``_scale_one``, and ``clip_grads`` builds its norm on
  ``'cuda'`` (seen with torchrun, 2 ranks, gloo; its DDP ran fine there).

Checkpoint state, the same from both paths: ``optimizer`` is a torch ``AdamW.state_dict()`` over
``param_groups(model)`` (full float32 moments of this rank's tensor-parallel slices: the distributed optimizer's
shards are gathered), ``scheduler`` the ``LambdaLR`` state; the model weights saved inside
``float32_weights()`` are the float32 (main) weights. So a checkpoint of one path resumes in the other.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel

from student.distributed import DistEnv, dp_group, tp_group
from student.schedule import make_scheduler
from student.settings import TrainSettings

Precision = Literal["bf16", "fp32"]


def resolve_precision(settings: TrainSettings, cuda: bool) -> Precision:
    """``train.precision`` for this device; bf16 without CUDA is refused (see the module docstring)."""
    if settings.precision == "auto":
        return "bf16" if cuda else "fp32"
    if settings.precision == "bf16" and not cuda:
        raise ValueError(
            "train.precision = 'bf16' needs CUDA: bf16 parameters with float32 main weights are megatron-core's "
            "mixed-precision optimizer, which megatron-core 0.16.1 runs on CUDA only; use 'fp32' or 'auto'"
        )
    return settings.precision


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (embeddings included), none on norm weights (megatron's default grouping too)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def torch_adamw(groups: list[dict[str, Any]], settings: TrainSettings) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        groups, lr=settings.lr, betas=(settings.adam_beta1, settings.adam_beta2), eps=1e-8, foreach=False
    )


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, tp_rank: int) -> float:
    """Clip to ``max_norm`` on the norm of the whole (unsharded) model's gradient; returns that norm.

    A tensor-parallel parameter (``tensor_model_parallel``) holds a distinct slice on each TP rank; others
    (norm weights) are replicated with equal gradients, so only TP rank 0 counts them.
    """
    squares = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in params:
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            squares += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(squares, group=tp_group())
    norm = float(squares.sqrt())
    scale = min(max_norm / (norm + 1e-6), 1.0)
    if scale < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def wrap_ddp(model: GPTModel, distributed_optimizer: bool) -> DistributedDataParallel:
    """megatron-core DDP around ``model``: float32 gradient buffer, bucketed reduce overlapped with backward."""
    model.config.calculate_per_token_loss = True  # sum over DP ranks; the caller scales by 1 / global tokens
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=True,
        use_distributed_optimizer=distributed_optimizer,
    )
    return DistributedDataParallel(model.config, ddp_config, model)


class TrainOptimizer(ABC):
    """A model's DDP wrapper, optimizer and schedule; see the module docstring."""

    def __init__(self, model: GPTModel, ddp: DistributedDataParallel, settings: TrainSettings) -> None:
        self.model, self.ddp, self.settings = model, ddp, settings
        self.params = [p for p in model.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        for p in self.params:
            p.grad = None

    def backward_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's backward: only the last one of a step starts the gradient reduction."""
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def _reduce_gradients(self, grad_scale: float) -> None:
        self.ddp.finish_grad_sync()
        self.ddp.scale_gradients(grad_scale)

    @abstractmethod
    def step(self, grad_scale: float) -> tuple[float, float]:
        """Reduce, scale by ``grad_scale``, clip, update, advance the schedule; returns (grad norm, lr used)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def float32_weights(self) -> contextlib.AbstractContextManager: ...


class TorchTrainOptimizer(TrainOptimizer):
    """CPU: megatron-core DDP (all-reduce), torch AdamW on float32 parameters, hand-written clipping."""

    def __init__(self, model: GPTModel, settings: TrainSettings, env: DistEnv) -> None:
        super().__init__(model, wrap_ddp(model, distributed_optimizer=False), settings)
        self.tp_rank = env.tp_rank
        self.optimizer = torch_adamw(param_groups(model, settings.weight_decay), settings)
        self.scheduler = make_scheduler(self.optimizer, settings)

    def step(self, grad_scale: float) -> tuple[float, float]:
        self._reduce_gradients(grad_scale)
        for p in self.params:
            p.grad = p.main_grad  # DDP's reduced float32 buffer (a view: no copy)
        norm = clip_gradients(self.params, self.settings.grad_clip, self.tp_rank)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return norm, lr

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        _load_schedule(self.scheduler, state["scheduler"], self.settings)

    def float32_weights(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class MegatronTrainOptimizer(TrainOptimizer):
    """CUDA: megatron-core DDP (reduce-scatter) and distributed optimizer, bf16 or float32 parameters.

    The model arrives in float32 with its weights loaded; those exact values become the float32 main weights
    (a bf16 copy of them would lose the low bits a float32 checkpoint or a Hugging Face init carries).
    """

    def __init__(self, model: GPTModel, settings: TrainSettings, precision: Precision) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        bf16 = precision == "bf16"
        initial = {name: p.detach().clone() for name, p in model.named_parameters()} if bf16 else None
        if bf16:
            model.bfloat16()
        super().__init__(model, wrap_ddp(model, distributed_optimizer=True), settings)
        config = OptimizerConfig(
            optimizer="adam",
            lr=settings.lr,
            min_lr=settings.min_lr,
            weight_decay=settings.weight_decay,
            adam_beta1=settings.adam_beta1,
            adam_beta2=settings.adam_beta2,
            adam_eps=1e-8,
            clip_grad=settings.grad_clip,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=True,
        )
        chained = get_megatron_optimizer(config, [self.ddp])
        (self.optimizer,) = getattr(chained, "chained_optimizers", [chained])
        self.inner: torch.optim.Optimizer = self.optimizer.optimizer  # torch AdamW over this rank's shards
        for group in self.inner.param_groups:  # megatron leaves per-group decay to its own scheduler
            group["weight_decay"] = settings.weight_decay * group.get("wd_mult", 1.0)
        self.scheduler = make_scheduler(self.inner, settings)
        self.names = {p: name for name, p in model.named_parameters()}
        self.order = [p for group in param_groups(model, settings.weight_decay) for p in group["params"]]
        if initial is not None:
            self._set_full({p: initial[self.names[p]] for p in self.order}, moments=None, step=None)

    def zero_grad(self) -> None:
        super().zero_grad()
        self.optimizer.zero_grad()

    def step(self, grad_scale: float) -> tuple[float, float]:
        self._reduce_gradients(grad_scale)
        lr = self.inner.param_groups[0]["lr"]
        ok, norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("megatron's optimizer skipped the step (non-finite gradients)")
        self.scheduler.step()
        return float(norm), lr

    # ----------------------------------------------------------------------------- full float32 state

    def _owned(self, p: torch.nn.Parameter) -> tuple[slice, torch.Tensor, dict[str, Any]] | None:
        """This DP rank's slice of ``p`` (flattened), its main-weight shard and AdamW state; None if none."""
        if p not in self.optimizer.model_param_group_index_map:
            return None
        rng = self.optimizer._get_model_param_range_map(p)["param"]
        gi, go = self.optimizer.model_param_group_index_map[p]
        main = self.inner.param_groups[gi]["params"][go]
        return slice(rng.start, rng.end), main, self.inner.state[main]

    def _gather(self) -> tuple[dict[torch.nn.Parameter, torch.Tensor], dict[str, torch.Tensor], int | None]:
        """Full float32 weights, moments ``exp_avg`` / ``exp_avg_sq`` (flat per parameter), and the AdamW step."""
        sizes = [p.numel() for p in self.order]
        flat = torch.zeros(3, sum(sizes), dtype=torch.float32, device=self.order[0].device)
        steps = []
        offset = 0
        for p, size in zip(self.order, sizes, strict=True):
            owned = self._owned(p)
            if owned is not None:
                where, main, state = owned
                lo, hi = offset + where.start, offset + where.stop
                flat[0, lo:hi] = main.detach().view(-1)
                if state:
                    flat[1, lo:hi] = state["exp_avg"].view(-1)
                    flat[2, lo:hi] = state["exp_avg_sq"].view(-1)
                    steps.append(int(state["step"]))
            offset += size
        dist.all_reduce(flat, group=dp_group())  # every element is owned by exactly one DP rank
        step = torch.tensor([max(steps, default=-1)], device=flat.device)
        dist.all_reduce(step, op=dist.ReduceOp.MAX, group=dp_group())
        weights, exp_avg, exp_avg_sq = (dict(zip(self.order, row.split(sizes), strict=True)) for row in flat)
        found = int(step) if int(step) >= 0 else None
        return weights, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, found

    def _set_full(
        self,
        weights: dict[torch.nn.Parameter, torch.Tensor] | None,
        moments: dict[str, dict[torch.nn.Parameter, torch.Tensor]] | None,
        step: int | None,
    ) -> None:
        """Set the main weights (and the model's copy) and/or the AdamW moments from full tensors."""
        with torch.no_grad():
            for p in self.order:
                owned = self._owned(p)
                if weights is not None:
                    full = weights[p].to(device=p.device, dtype=torch.float32).reshape(-1)
                    p.copy_(full.view_as(p))  # every DP rank holds the whole (bf16) parameter
                    if owned is not None:
                        owned[1].copy_(full[owned[0]].view_as(owned[1]))
                if moments is not None and owned is not None:
                    where, main, state = owned
                    state.clear()
                    state["step"] = torch.tensor(float(step), dtype=torch.float32)
                    for key, values in moments.items():
                        state[key] = (
                            values[p].to(main.device, torch.float32).reshape(-1)[where].view_as(main).clone()
                        )

    def state_dict(self) -> dict[str, Any]:
        _, moments, step = self._gather()
        template = torch_adamw(param_groups(self.model, self.settings.weight_decay), self.settings)
        out = template.state_dict()
        for group in out["param_groups"]:
            group["lr"] = self.inner.param_groups[0]["lr"]
            group["initial_lr"] = self.settings.lr
        if step is not None:
            out["state"] = {
                i: {
                    "step": torch.tensor(float(step)),
                    **{key: values[p].view_as(p).cpu().clone() for key, values in moments.items()},
                }
                for i, p in enumerate(self.order)
            }
        return {"optimizer": out, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["optimizer"]
        if saved["state"]:
            per_param = [saved["state"][i] for i in range(len(self.order))]
            moments = {
                key: {p: s[key] for p, s in zip(self.order, per_param, strict=True)}
                for key in ("exp_avg", "exp_avg_sq")
            }
            self._set_full(None, moments, int(per_param[0]["step"]))
        for group in self.inner.param_groups:
            group["lr"] = saved["param_groups"][0]["lr"]
        _load_schedule(self.scheduler, state["scheduler"], self.settings)

    @contextlib.contextmanager
    def float32_weights(self) -> Iterator[None]:
        weights, _, _ = self._gather()
        kept = {p: p.data for p in self.order}
        try:
            for p in self.order:
                p.data = weights[p].view_as(p)
            yield
        finally:
            for p, data in kept.items():
                p.data = data


def _load_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any], settings: TrainSettings
) -> None:
    """Restore the schedule's position whatever the number of parameter groups of the path that saved it."""
    scheduler.load_state_dict(state)
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [settings.lr] * len(groups)
    scheduler._last_lr = [group["lr"] for group in groups]


def make_train_optimizer(model: GPTModel, settings: TrainSettings, env: DistEnv) -> TrainOptimizer:
    """The path for this device (see the module docstring); the model must hold float32 weights."""
    cuda = env.device.type == "cuda"
    precision = resolve_precision(settings, cuda)
    if cuda:
        return MegatronTrainOptimizer(model, settings, precision)
    return TorchTrainOptimizer(model, settings, env)
