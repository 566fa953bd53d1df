"""The student: megatron-core model, losses, training, checkpoints, inference, evaluation and export."""

import warnings

# Third-party warnings every run would print, silenced at their source (ours are kept). megatron-core warns at
# import that Apex / Transformer Engine are missing: the torch fallbacks it then uses are exactly what this
# project runs on CPU. Its default ``cuda_graph_scope`` warns as deprecated although we never set it. Its
# checkpoint strategy calls torch's deprecated ``load_state_dict`` and ShardedTensor path (FutureWarnings of
# torch.distributed.checkpoint); both are inside megatron-core 0.16.1, which we pin. Its tensor-parallel gathers
# call ``all_gather_into_tensor``, which torch 2.13 marks as deprecated (a FutureWarning on every rank).
for _message in (
    "Apex is not installed",
    "Transformer Engine and Apex",
    "Transformer Engine is not installed",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "full scope is deprecated",
    "all_gather_into_tensor` is deprecated",
):
    warnings.filterwarnings("ignore", message=f".*{_message}.*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing")
