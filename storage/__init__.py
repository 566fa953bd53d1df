"""Teacher data on disk: Parquet shards (``shards``, ``schema``, ``codec``), the DuckDB catalog (``catalog``),
snapshots (``snapshot``) and the packed training reader (``reader``). See docs/architecture.md."""
