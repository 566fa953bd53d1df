"""Settings of the student: architecture (`[model]`), training (`[train]`) and loss (`[loss]`)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelSettings(BaseModel):
    """A Llama-compatible megatron-core GPT (RMSNorm, SwiGLU, RoPE, no biases, embeddings tied or not)."""

    model_config = ConfigDict(extra="forbid")

    num_layers: int = Field(2, gt=0, description="Transformer layers.")
    hidden_size: int = Field(128, gt=0, description="Model width.")
    num_attention_heads: int = Field(
        4, gt=0, description="Attention heads (must divide hidden_size and be divisible by TP)."
    )
    ffn_hidden_size: int = Field(344, gt=0, description="SwiGLU inner width.")
    seq_length: int = Field(128, gt=1, description="Packed training sequence length (and max positions).")
    rotary_base: float = Field(10000.0, gt=0, description="RoPE base (Hugging Face's rope_theta).")
    norm_epsilon: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    init_method_std: float = Field(0.02, gt=0, description="Std of the normal weight initialisation.")
    num_query_groups: int | None = Field(
        None, gt=0, description="Key/value heads for grouped-query attention (None: one per attention head)."
    )
    hidden_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after attention and MLP.")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention probabilities.")
    vocab_multiple: int = Field(
        128, gt=0, description="The vocabulary is padded to a multiple of this times the TP size."
    )
    tie_embeddings: bool = Field(
        False, description="Tie the output layer to the input embedding (one shared [V, h] matrix)."
    )
    init: str | None = Field(
        None,
        description="A Hugging Face Llama directory to start from; its architecture replaces the fields above "
        "except seq_length.",
    )


class LossSettings(BaseModel):
    """See docs/losses.md for the math of every option."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["soft", "hard", "mse", "sampled"] = Field(
        "soft",
        description="soft: soft CE over teacher top-k; hard: ordinary CE; mse: logit MSE; sampled: soft CE "
        "against unbiased sampled targets (batch keys sample_ids, sample_weights).",
    )
    tail: Literal["none", "renormalize", "tail_bucket", "actual_bin"] = Field(
        "tail_bucket",
        description="Treatment of the teacher mass outside the top-k (kind=soft); actual_bin splits the "
        "actual next token's bin out of the tail bucket where its logprob is known (batch key actual_logprob).",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="Temperature on both teacher and student; the loss is scaled by tau^2. kind=sampled: the "
        "temperature the samples were drawn at.",
    )
    alpha: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Weight of the soft loss; 1-alpha goes to hard CE on the actual next token.",
    )
    no_teacher: Literal["mask", "hard"] = Field(
        "hard", description="Positions without teacher top-k (e.g. prompt tokens): masked, or hard CE."
    )
    mse_center: bool = Field(
        True,
        description="kind=mse: subtract each row's mean difference (logits are defined up to a per-row shift).",
    )


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tensor_parallel: int = Field(2, gt=0, description="Tensor-parallel size (TP).")
    data_parallel: int = Field(
        1, gt=0, description="Data-parallel size (DP); torchrun starts TP x DP processes."
    )
    micro_batch_size: int = Field(8, gt=0, description="Sequences per micro-batch per data-parallel rank.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr: float = Field(3e-4, ge=0, description="Final learning rate of the cosine schedule.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient clipping max norm.")
    log_every: int = Field(10, gt=0, description="Steps between train-loss log lines.")
    eval_every: int = Field(50, gt=0, description="Steps between validation evaluations.")
    eval_batches: int = Field(8, gt=0, description="Validation micro-batches per evaluation.")
    checkpoint_every: int = Field(100, gt=0, description="Steps between checkpoints.")
    seed: int = Field(1234, description="Random seed (model init, data order, dropout).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Parameter precision: bf16 (float32 main weights, GPU only) or fp32; auto: bf16 on GPU, fp32 on CPU.",
    )
    threads_per_rank: int = Field(1, gt=0, description="torch intra-op threads per rank on CPU.")
    keep_checkpoints: int = Field(
        2, gt=0, description="Newest step checkpoints kept (older ones are deleted)."
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    fused_output_loss: bool = Field(
        True,
        description="Fuse the output layer into the loss: the [tokens, vocab] logits are never held "
        "(docs/losses.md); false: the output layer's logits, then the loss.",
    )
