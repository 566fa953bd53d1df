"""Settings of the storage layer (the `[storage]` section of the config file)."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage.filesystem import DataPath, data_path, default_catalog_dir, is_remote


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path | str = Field(
        Path("data"),
        description="Folder (or s3://bucket/prefix URL) holding the Parquet shards and snapshots.",
    )
    catalog_dir: Path | None = Field(
        None,
        description="Local folder of the DuckDB catalog index (default: data_dir, or run.work_dir/catalog for s3).",
    )
    s3_endpoint: str = Field(
        "",
        description="S3 endpoint URL (e.g. http://127.0.0.1:8333); default AWS_ENDPOINT_URL or AWS itself.",
    )
    s3_region: str = Field("", description="S3 region; default AWS_REGION / AWS_DEFAULT_REGION.")
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
    compression_level: int = Field(
        1,
        ge=1,
        le=22,
        description=(
            "zstd level of the shards' Parquet pages (1 writes 5-7x faster than 9; on SmolLM2's top-20 level 9 "
            "is 0.2% smaller, on data whose top-k rows repeat exactly up to 7%: see BENCHMARKS.md)."
        ),
    )

    @field_validator("data_dir", mode="after")
    @classmethod
    def _local_or_url(cls, value: Path | str) -> Path | str:
        """A local folder is a Path; an s3:// URL stays a string (a Path would fold its "//")."""
        if is_remote(value):
            data_path(str(value))  # fails early on a malformed URL
            return str(value)
        return Path(value)

    def location(self) -> DataPath:
        """``data_dir`` as a ``Path`` or an S3 ``RemotePath`` (with this config's endpoint and region)."""
        return data_path(self.data_dir, self.s3_endpoint, self.s3_region)

    def index_dir(self) -> Path:
        """The local folder of the DuckDB catalog (``catalog_dir``, else ``default_catalog_dir``)."""
        return self.catalog_dir if self.catalog_dir is not None else default_catalog_dir(self.location())
