"""Settings of the storage layer (the `[storage]` section of the config file)."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(
        Path("data"), description="Folder holding Parquet shards, vocab tables and the DuckDB catalog."
    )
    shard_max_records: int = Field(
        256, gt=0, description="Records buffered before a shard is written (a crash loses at most this many)."
    )
    logprob_codec: Literal["q16", "f16", "f32"] = Field(
        "q16",
        description="Encoding of top-k logprobs on disk: q16 (mass-preserving 16-bit quantization), f16 or f32.",
    )
    compression: Literal["zstd", "snappy", "none"] = Field(
        "zstd", description="Parquet compression codec of shards."
    )
    compression_level: int = Field(9, ge=1, le=22, description="zstd level for shards.")
