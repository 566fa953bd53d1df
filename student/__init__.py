"""The student: megatron-core model, losses, training, checkpoints, inference, evaluation and export."""

import warnings

# megatron-core warns at import time that Apex / Transformer Engine are missing; the torch fallbacks it then
# uses are exactly what this project runs on CPU, so the warnings carry no information here.
warnings.filterwarnings(
    "ignore", message=".*(Apex is not installed|Transformer Engine and Apex|CUDA_DEVICE_MAX_CONNECTIONS).*"
)
