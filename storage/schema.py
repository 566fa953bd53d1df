"""The Arrow schema of a shard and the conversion ``TopKRecord``s <-> one self-contained Arrow table.

One row per sample. Ids on disk are *shard ranks*: teacher ids renumbered by decreasing frequency within the
shard (0 = most frequent), so the numbers zstd sees are small. The shard's vocabulary table, in rank order
(teacher id and token bytes of every rank), travels in the Parquet key-value metadata (``distill.vocab``,
zstd-compressed), so a shard is readable alone and concurrent collectors never need to agree on ids.

Per row (``n`` positions, ``E`` = Σ k top-k entries):

=================  ==================  ===================================================================
column             type                meaning
=================  ==================  ===================================================================
token_rank         planes(1) [n]       rank of the actual token within its position's top-k; 255: not there
token_other        list<int32>         shard ranks of the actual tokens with ``token_rank == 255``, in order
topk_k             planes(2) [n]       entries per position (0 where the teacher gave none)
topk_ids           planes(3) [E]       shard ranks, sorted by decreasing logprob within a position
topk_logprobs      planes(2) [E]       q16: code deltas (see ``storage.codec``); f16/f32: list<float16/32>
topk_tail          planes(2) [n]       q16 only: code of the residual mass ``1 − Σ p``
topk_logits        list<float32> [E]   raw teacher logits, null when the teacher gave none
token_logprob      planes(2) [n]       optional (format 3): float16 bits of the actual token's logprob, NaN
sample_n           planes(2) [n]       optional (format 3): distinct tail samples per position (M_p)
sample_ids         planes(3) [Σ M_p]   shard ranks of the tail samples, in the record's order
sample_counts      planes(2) [Σ M_p]   draws of each tail sample (a position's counts sum to its S)
=================  ==================  ===================================================================

plus the request metadata (sample_id, split, teacher, mode, prompt, text, params as JSON, created_at, usage,
finish_reason). The integer columns with a value per entry or per position are stored as *byte planes*:
``planes(n)`` is a struct of ``n`` binary fields ``b0..b{n-1}``, field ``bi`` holding byte ``i`` (little-endian)
of each of the row's values. zstd then sees each byte plane as its own stream (high bytes are nearly all zero,
low bytes of small ranks are skewed), and reading is a decompress and a copy, with no per-value Parquet list
decoding (3x faster than ``list<int32>`` with BYTE_STREAM_SPLIT at the same size; format 1 still kept the
per-position columns as lists, which cost the reader a tenth of its time; format-1 shards still read).
``token_other`` (a few values per row) keeps Parquet's BYTE_STREAM_SPLIT list encoding.

Format 3 adds the optional columns (present when any record of the shard has them; formats 1 and 2 still
read). The actual token's logprob is float16 rather than q16: q16 spends its steps on KL of a distribution,
while this value feeds a cross-entropy directly, where float16's relative error (≤ 2⁻¹¹ of the logprob, so
≤ 5e-4 nats at logprob −1 and ≤ 8e-3 at −16) beats q16's ≈ 2⁻⁷ nats near p = 1 (``benchmarks/storage.py``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from storage.codec import (
    OPENAI_SENTINEL,
    Q16Params,
    concat_ranges,
    decode_logprobs,
    encode_logprobs,
    frequency_ranks,
    segment_starts,
    sort_positions,
)
from storage.kernels import (
    copy_prefixes,
    first_match,
    gather_ranges,
    interleave_planes,
    split_planes,
    topk_counts,
)
from storage.records import TeacherVocab, TopKRecord

FORMAT_VERSION = "3"
READABLE_FORMATS = (
    "1",
    "2",
    "3",
)  # format 1: token_rank, topk_k, topk_tail were lists (uint8, uint16, uint16)
NOT_IN_TOPK = 255
META_FORMAT = b"distill.format"
META_CODEC = b"distill.logprob_codec"
META_CODEC_PARAMS = b"distill.codec_params"
META_VOCAB = b"distill.vocab"
META_MAX_K = b"distill.max_k"
META_HAS_LOGITS = b"distill.has_logits"
META_HAS_TOKEN_LOGPROB = b"distill.has_token_logprob"
META_MAX_SAMPLES = b"distill.max_samples"  # most distinct tail samples at one position; absent: no samples
# zstd level of the vocabulary table. Level 19 packs the teacher ids (ascending runs in rank order) about twice
# as tightly, but costs ~400 ms for a 256-record shard of a 200k vocabulary (180k entries), 1.5 ms per 1,000
# tokens when the whole collector has 5; level 3 takes ~3 ms there for a table a third larger (+1.1 B/token,
# ~2% of the shard). Levels 4-17 gain under 3% over 3 at up to 100x its time.
VOCAB_LEVEL = 3


ID_PLANES = 3  # shard ranks up to 2**24 - 1
CODE_PLANES = 2  # q16 code deltas up to 2**16 - 1


def planes_type(n: int) -> pa.DataType:
    return pa.struct([pa.field(f"b{i}", pa.binary(), nullable=False) for i in range(n)])


_LOGPROB_TYPES = {
    "q16": planes_type(CODE_PLANES),
    "f16": pa.list_(pa.float16()),
    "f32": pa.list_(pa.float32()),
}
_METADATA_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("teacher", pa.string(), nullable=False),
    pa.field("mode", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("text", pa.string()),  # null: the text is exactly the UTF-8 of the tokens' bytes
    pa.field("params", pa.string(), nullable=False),
    pa.field("created_at", pa.float64(), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("completion_tokens", pa.int32(), nullable=False),
    pa.field("finish_reason", pa.string()),
]
METADATA_COLUMNS = [f.name for f in _METADATA_FIELDS]
TOKEN_COLUMNS = ["token_rank", "token_other"]
TOPK_COLUMNS = ["topk_k", "topk_ids", "topk_logprobs", "topk_tail"]  # (topk_tail: q16 shards only)
SAMPLE_COLUMNS = ["sample_n", "sample_ids", "sample_counts"]
OPTIONAL_FIELDS = [  # format 3, each present or not
    pa.field("token_logprob", planes_type(2), nullable=False),
    pa.field("sample_n", planes_type(2), nullable=False),
    pa.field("sample_ids", planes_type(ID_PLANES), nullable=False),
    pa.field("sample_counts", planes_type(2), nullable=False),
]
BYTE_SPLIT_COLUMNS = ["token_other", "topk_logprobs"]  # the list<int/float> ones


class ShardError(ValueError):
    """A shard file that cannot be used; the message names the file and what is wrong."""


def shard_schema(codec: str, version: str = FORMAT_VERSION) -> pa.Schema:
    if codec not in _LOGPROB_TYPES:
        raise ValueError(f"unknown logprob codec {codec!r} (expected one of {sorted(_LOGPROB_TYPES)})")

    def position_type(planes: int, list_type: pa.DataType) -> pa.DataType:
        """A per-position column's type: a list in format 1, byte planes since."""
        return pa.list_(list_type) if version == "1" else planes_type(planes)

    fields = [
        *_METADATA_FIELDS,
        pa.field("token_rank", position_type(1, pa.uint8()), nullable=False),
        pa.field("token_other", pa.list_(pa.int32()), nullable=False),
        pa.field("topk_k", position_type(2, pa.uint16()), nullable=False),
        pa.field("topk_ids", planes_type(ID_PLANES), nullable=False),
        pa.field("topk_logprobs", _LOGPROB_TYPES[codec], nullable=False),
    ]
    if codec == "q16":
        fields.append(pa.field("topk_tail", position_type(2, pa.uint16()), nullable=False))
    fields.append(pa.field("topk_logits", pa.list_(pa.float32())))
    return pa.schema(fields)


def encode_vocab(
    teacher_ids: np.ndarray, lengths: np.ndarray, data: bytes, level: int = VOCAB_LEVEL
) -> bytes:
    """``[n][ids int32 × n][lengths uint32 × n][bytes…]``, zstd-compressed (``data``: the tokens' bytes,
    concatenated in the order of ``teacher_ids``)."""
    raw = b"".join(
        [
            struct.pack("<I", len(teacher_ids)),
            np.asarray(teacher_ids).astype("<i4").tobytes(),
            np.asarray(lengths).astype("<u4").tobytes(),
            data,
        ]
    )
    return pa.Codec("zstd", level).compress(raw, asbytes=True)


def decode_vocab(blob: bytes, source: str) -> tuple[np.ndarray, pa.BinaryArray]:
    """The vocabulary table: (teacher ids, token bytes as an Arrow binary array over the decompressed blob).

    No Python object per token: the reader maps whole tables at once (``pyarrow.compute.index_in``)."""
    try:
        raw = pa.Codec("zstd").decompress(blob, decompressed_size=None, asbytes=True)
    except Exception:  # pyarrow needs the size for some codecs; fall back to a streaming read
        raw = pa.input_stream(pa.py_buffer(blob), compression="zstd").read()
    try:
        (n,) = struct.unpack_from("<I", raw, 0)
        ids = np.frombuffer(raw, dtype="<i4", count=n, offset=4).astype(np.int64)
        lengths = np.frombuffer(raw, dtype="<u4", count=n, offset=4 + 4 * n).astype(np.int64)
        offsets = 4 + 8 * n + segment_starts(lengths)
        if offsets[-1] != len(raw) or len(raw) > np.iinfo(np.int32).max:
            raise ValueError("length mismatch")
    except (struct.error, ValueError) as exc:
        raise ShardError(f"{source}: vocabulary table in the metadata is damaged ({exc})") from None
    table = pa.Array.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(raw)]
    )
    return ids, table


def _list_array(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    offsets = segment_starts(lengths)
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("shard too large for 32-bit list offsets; lower storage.shard_max_records")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))


def to_planes(values: np.ndarray, lengths: np.ndarray, planes: int) -> pa.StructArray:
    """Non-negative ints -> ``planes(n)``: per row, one binary field per little-endian byte."""
    split = np.empty((planes, len(values)), dtype=np.uint8)  # row i: byte i of every value
    top = split_planes(np.asarray(values), split)
    if top >= 1 << (8 * planes):
        raise ValueError(f"value {top} does not fit in {planes} byte planes")
    offsets = pa.py_buffer(segment_starts(lengths).astype(np.int32))
    fields = [
        pa.Array.from_buffers(pa.binary(), len(lengths), [None, offsets, pa.py_buffer(plane)])
        for plane in split
    ]
    return pa.StructArray.from_arrays(fields, fields=list(planes_type(planes)))


def one_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The column as one array; a single chunk is used as it is (``combine_chunks`` copies even then)."""
    if isinstance(column, pa.Array):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def binary_buffers(array: pa.BinaryArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n + 1], bytes) of a binary array, as numpy views of its Arrow buffers."""
    offsets = np.frombuffer(array.buffers()[1], np.int32, count=len(array) + 1, offset=4 * array.offset)
    data = array.buffers()[2]
    return offsets, np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)


def plane_rows(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``to_planes``: (the flat int32 values of all rows in order, row offsets [rows + 1])."""
    planes, row_offsets = [], None
    for field in one_array(column).flatten():  # (flatten applies the struct's own offset)
        offsets, data = binary_buffers(field)
        if row_offsets is not None and not np.array_equal(offsets - offsets[0], row_offsets):
            raise ShardError("byte planes of different lengths (damaged shard)")
        row_offsets = (offsets - offsets[0]).astype(np.int64)
        planes.append(data[offsets[0] : offsets[-1]])
    if row_offsets is None or any(len(p) != row_offsets[-1] for p in planes):
        raise ShardError("byte planes missing or truncated (damaged shard)")
    values = np.empty(len(planes[0]), dtype=np.int32)
    interleave_planes(*planes, *planes[:1] * (4 - len(planes)), len(planes), values)
    return values, row_offsets


def from_planes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The flat int32 values of a ``planes(n)`` column (see ``plane_rows``)."""
    return plane_rows(column)[0]


def per_position(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, row offsets) of a per-position column: byte planes (format 2) or a list (format 1)."""
    if pa.types.is_struct(column.type):
        return plane_rows(column)
    return _flat_values(column, np.int64)


@dataclass
class _Flat:
    """All positions of a batch of records, flattened (entries sorted per position)."""

    tokens: np.ndarray  # teacher ids [P]
    k: np.ndarray  # [P]
    ids: np.ndarray  # teacher ids [E]
    logprobs: np.ndarray  # [E]
    logits: np.ndarray | None  # [E] (NaN where a record has none); None when no record has any
    positions_per_row: np.ndarray  # [R]


def _sorted_topk(record: TopKRecord, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The record's (ids, float32 logprobs, logits) with each row's real entries first, by decreasing logprob
    (``sort_positions``, skipped when the rows are already so); their count per row goes to ``k``."""
    ids, logits = record.topk_ids, record.topk_logits
    logprobs = np.asarray(record.topk_logprobs, dtype=np.float32)  # (sorted as the values stored)
    if logits is not None and logits.shape != ids.shape:
        raise ValueError(f"sample {record.sample_id}: topk_logits shape {logits.shape} != topk_ids")
    if not topk_counts(ids, logprobs, OPENAI_SENTINEL, k):
        ids, logprobs, logits, _ = sort_positions(ids, logprobs, logits)
    return ids, logprobs, logits


def _flatten(records: list[TopKRecord]) -> _Flat:
    """Each position's real top-k entries, copied once from the records' padded arrays into flat ones."""
    n = np.array([len(r.tokens) for r in records], dtype=np.int64)
    rows = segment_starts(n)
    k = np.empty(int(rows[-1]), dtype=np.int64)
    tops = [_sorted_topk(r, k[a:b]) for r, a, b in zip(records, rows[:-1], rows[1:], strict=True)]
    id_type = np.result_type(
        np.int32, *(np.asarray(r.tokens).dtype for r in records), *(t[0].dtype for t in tops)
    )
    total = int(k.sum())
    ids = np.empty(total, dtype=id_type)
    logprobs = np.empty(total, dtype=np.float32)
    any_logits = any(top[2] is not None for top in tops)
    logits = np.full(total, np.nan, dtype=np.float32) if any_logits else None
    start = 0
    for (top_ids, top_logprobs, top_logits), a, b in zip(tops, rows[:-1], rows[1:], strict=True):
        copy_prefixes(top_logprobs, k[a:b], logprobs, start)
        if top_logits is not None:
            copy_prefixes(top_logits, k[a:b], logits, start)
        start = copy_prefixes(top_ids, k[a:b], ids, start)
    tokens = np.concatenate([np.zeros(0, id_type), *(r.tokens for r in records)], dtype=id_type)
    return _Flat(tokens, k, ids, logprobs, logits, n)


def _token_text(
    offsets: np.ndarray, data: np.ndarray, ranks: np.ndarray, positions_per_row: np.ndarray
) -> list[bytes]:
    """Per row, the concatenated bytes of its tokens; token ``t``'s bytes are ``data[offsets[t]:offsets[t+1]]``."""
    offsets = offsets.astype(np.int64)
    lengths = np.diff(offsets)[ranks]
    bounds = segment_starts(lengths)[segment_starts(positions_per_row)]  # byte offset of each row
    stream = np.empty(int(bounds[-1]), dtype=np.uint8)
    gather_ranges(data, offsets[:-1][ranks], lengths, stream)
    return [stream[a:b].tobytes() for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)]


def _stored_texts(records: list[TopKRecord], spelled: list[bytes]) -> list[str | None]:
    """The text column: null where the text is exactly what the tokens spell (the usual case)."""
    out = []
    for record, data in zip(records, spelled, strict=True):
        try:
            same = data.decode("utf-8") == record.text
        except UnicodeDecodeError:
            same = False
        out.append(None if same else record.text)
    return out


def _flat_samples(records: list[TopKRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Tail samples of all positions: (distinct samples per position [P], ids, counts), or None when no record
    has any. Entries keep the record's order; padding (-1 id or count 0) is dropped."""
    if all(r.sample_ids is None for r in records):
        return None
    per_position, ids, counts = [], [], []
    for r in records:
        if r.sample_ids is None:
            per_position.append(np.zeros(len(r.tokens), np.int64))
            continue
        valid = (r.sample_ids >= 0) & (r.sample_counts > 0)
        if (r.sample_counts < 0).any() or (r.sample_counts > np.iinfo(np.uint16).max).any():
            raise ValueError(f"sample {r.sample_id}: sample_counts outside [0, 65535]")
        per_position.append(valid.sum(axis=1).astype(np.int64))
        ids.append(r.sample_ids[valid].astype(np.int64))
        counts.append(r.sample_counts[valid].astype(np.int64))
    empty = np.zeros(0, np.int64)
    return np.concatenate(per_position), np.concatenate([empty, *ids]), np.concatenate([empty, *counts])


def _flat_token_logprobs(records: list[TopKRecord]) -> np.ndarray | None:
    """The actual tokens' logprobs of all positions as float16 bit patterns (uint16; NaN where unknown), or
    None."""
    if all(r.token_logprobs is None for r in records):
        return None
    values = [
        np.full(len(r.tokens), np.nan, np.float32) if r.token_logprobs is None else r.token_logprobs
        for r in records
    ]
    return np.concatenate([np.zeros(0, np.float32), *values]).astype(np.float16).view(np.uint16)


def records_to_table(
    records: list[TopKRecord], vocab: TeacherVocab, codec: str, params: Q16Params
) -> pa.Table:
    """Encode records into one shard table (schema ``shard_schema(codec)``) with its vocab in the metadata."""
    flat = _flatten(records)
    if flat.k.size and flat.k.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"top-k of {flat.k.max()} entries per position is more than a shard stores")
    samples = _flat_samples(records)
    sample_ids = samples[1] if samples is not None else np.zeros(0, np.int32)
    # the flat arrays' teacher ids become shard ranks (in place: no second copy of the largest array)
    ranks = frequency_ranks(flat.tokens, flat.ids, sample_ids, in_place=True)
    vocab_ids, token_ranks, entry_ranks, sample_ranks = ranks
    try:
        vocab_lengths, vocab_data = vocab.table(vocab_ids)
    except KeyError as exc:
        bad = exc.args[0]
        owner = next(
            r.sample_id
            for r in records
            if bad in r.tokens
            or (r.topk_ids == bad).any()
            or (r.sample_ids is not None and (r.sample_ids == bad).any())
        )
        raise ValueError(f"sample {owner}: teacher id {bad} is not in the teacher vocabulary") from None
    starts = segment_starts(flat.k)
    width = int(flat.k.max()) if flat.k.size else 0
    in_topk = np.empty(len(flat.tokens), dtype=np.uint8)  # first match in a position's first 255, or 255
    first_match(entry_ranks, starts, token_ranks, NOT_IN_TOPK, NOT_IN_TOPK, in_topk)
    other = in_topk == NOT_IN_TOPK

    n_rows = flat.positions_per_row
    row_of_position = np.repeat(np.arange(len(records)), n_rows)
    entries_per_row = np.diff(starts[segment_starts(n_rows)])
    other_per_row = np.bincount(row_of_position[other], minlength=len(records))
    values, tail = encode_logprobs(codec, flat.logprobs, flat.k, params)

    spelled = _token_text(
        segment_starts(vocab_lengths), np.frombuffer(vocab_data, np.uint8), token_ranks, n_rows
    )
    has_logits = np.array([r.topk_logits is not None for r in records])
    if flat.logits is None:
        logits = pa.nulls(len(records), pa.list_(pa.float32()))
    else:
        logits = _list_array(flat.logits, entries_per_row, pa.float32())
        if not has_logits.all():
            logits = pa.ListArray.from_arrays(logits.offsets, logits.values, mask=pa.array(~has_logits))

    columns: dict[str, pa.Array] = {
        "sample_id": pa.array([r.sample_id for r in records], pa.string()),
        "split": pa.array([r.split for r in records], pa.string()),
        "teacher": pa.array([r.teacher for r in records], pa.string()),
        "mode": pa.array([r.mode for r in records], pa.string()),
        "prompt": pa.array([r.prompt for r in records], pa.string()),
        "text": pa.array(_stored_texts(records, spelled), pa.string()),
        "params": pa.array([json.dumps(r.params, sort_keys=True) for r in records], pa.string()),
        "created_at": pa.array([float(r.created_at) for r in records], pa.float64()),
        "prompt_tokens": pa.array([int(r.prompt_tokens) for r in records], pa.int32()),
        "completion_tokens": pa.array([int(r.completion_tokens) for r in records], pa.int32()),
        "finish_reason": pa.array([r.finish_reason for r in records], pa.string()),
        "token_rank": to_planes(in_topk, n_rows, 1),
        "token_other": _list_array(token_ranks[other].astype(np.int32), other_per_row, pa.int32()),
        "topk_k": to_planes(flat.k, n_rows, 2),
        "topk_ids": to_planes(entry_ranks, entries_per_row, ID_PLANES),
        "topk_logprobs": (
            to_planes(values, entries_per_row, CODE_PLANES)
            if codec == "q16"
            else _list_array(values, entries_per_row, _LOGPROB_TYPES[codec].value_type)
        ),
    }
    if tail is not None:
        columns["topk_tail"] = to_planes(tail, n_rows, 2)
    columns["topk_logits"] = logits
    token_logprob = _flat_token_logprobs(records)
    if token_logprob is not None:
        columns["token_logprob"] = to_planes(token_logprob, n_rows, 2)
    if samples is not None:
        sample_n, _, sample_counts = samples
        samples_per_row = np.bincount(row_of_position, weights=sample_n, minlength=len(records)).astype(
            np.int64
        )
        columns["sample_n"] = to_planes(sample_n, n_rows, 2)
        columns["sample_ids"] = to_planes(sample_ranks, samples_per_row, ID_PLANES)
        columns["sample_counts"] = to_planes(sample_counts, samples_per_row, 2)
    metadata = {
        META_FORMAT: FORMAT_VERSION.encode(),
        META_CODEC: codec.encode(),
        META_CODEC_PARAMS: json.dumps(params.to_dict()).encode(),
        META_VOCAB: encode_vocab(vocab_ids, vocab_lengths, vocab_data),
        META_MAX_K: str(width).encode(),
        META_HAS_LOGITS: b"1" if has_logits.any() else b"0",
        META_HAS_TOKEN_LOGPROB: b"0" if token_logprob is None else b"1",
    }
    if samples is not None:
        metadata[META_MAX_SAMPLES] = str(int(samples[0].max(initial=0))).encode()
    schema = shard_schema(codec)
    for field in OPTIONAL_FIELDS:
        if field.name in columns:
            schema = schema.append(field)
    return pa.Table.from_pydict(columns, schema=schema.with_metadata(metadata))


@dataclass
class ShardArrays:
    """A decoded shard as flat numpy arrays (what the reader consumes); ids are shard ranks.

    ``row_offsets[r]:row_offsets[r+1]`` are row ``r``'s positions; ``entry_offsets[p]:entry_offsets[p+1]`` are
    position ``p``'s top-k entries. ``vocab_table[rank]`` / ``vocab_ids[rank]`` give each rank's token bytes and
    teacher id (``vocab_bytes``: the same bytes as a Python list). Optional (None when the shard has none):
    ``token_logprobs`` [P] (NaN: unknown); position ``p``'s tail samples are
    ``sample_offsets[p]:sample_offsets[p+1]`` of ``sample_ids`` (shard ranks) and ``sample_counts``.
    """

    table: pa.Table  # the metadata columns
    row_offsets: np.ndarray
    tokens: np.ndarray
    entry_offsets: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    topk_logits: np.ndarray | None  # NaN for rows without logits; None when no row has any
    vocab_ids: np.ndarray
    vocab_table: pa.BinaryArray
    token_logprobs: np.ndarray | None = None
    sample_offsets: np.ndarray | None = None
    sample_ids: np.ndarray | None = None
    sample_counts: np.ndarray | None = None

    @property
    def vocab_bytes(self) -> list[bytes]:
        return self.vocab_table.to_pylist()

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def k(self) -> np.ndarray:
        return np.diff(self.entry_offsets)


def _flat_values(column: pa.ChunkedArray | pa.Array, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values, row offsets) of a list column, zero-copy where Arrow allows."""
    array = one_array(column)
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy(zero_copy_only=False)
    values = values[offsets[0] : offsets[-1]].astype(dtype, copy=False)
    return values, offsets - offsets[0]


def format_of(schema: pa.Schema, source: str) -> str:
    """The shard format version, one this code reads."""
    metadata = schema.metadata or {}
    if META_CODEC not in metadata or META_VOCAB not in metadata:
        raise ShardError(f"{source}: not a distill shard (no {META_CODEC.decode()} / vocab metadata)")
    version = metadata.get(META_FORMAT, b"?").decode()
    if version not in READABLE_FORMATS:
        raise ShardError(
            f"{source}: shard format {version!r}, this version reads {' and '.join(READABLE_FORMATS)}"
        )
    return version


def codec_of(schema: pa.Schema, source: str) -> tuple[str, Q16Params]:
    format_of(schema, source)
    metadata = schema.metadata
    codec = metadata[META_CODEC].decode()
    if codec not in _LOGPROB_TYPES:
        raise ShardError(f"{source}: unknown logprob codec {codec!r}")
    params = Q16Params(**json.loads(metadata.get(META_CODEC_PARAMS, b"{}")))
    return codec, params


def check_schema(schema: pa.Schema, source: str) -> str:
    """Raise ``ShardError`` naming the file and the first differing column unless ``schema`` is a shard's."""
    codec, _ = codec_of(schema, source)
    expected = shard_schema(codec, format_of(schema, source))
    for field in expected:
        index = schema.get_field_index(field.name)
        if index < 0:
            raise ShardError(f"{source}: schema mismatch: column {field.name!r} is missing")
        got = schema.field(index).type
        if not got.equals(field.type):
            raise ShardError(
                f"{source}: schema mismatch: column {field.name!r} has type {got}, expected {field.type}"
            )
    optional = {f.name: f for f in OPTIONAL_FIELDS} if format_of(schema, source) not in ("1", "2") else {}
    for name in set(schema.names) & set(optional):
        got = schema.field(name).type
        if not got.equals(optional[name].type):
            raise ShardError(
                f"{source}: schema mismatch: column {name!r} has type {got}, expected {optional[name].type}"
            )
    present = [name for name in SAMPLE_COLUMNS if name in schema.names]
    if present and len(present) != len(SAMPLE_COLUMNS):
        raise ShardError(
            f"{source}: schema mismatch: sample columns {present} without the rest of {SAMPLE_COLUMNS}"
        )
    extra = set(schema.names) - set(expected.names) - set(optional)
    if extra:
        raise ShardError(f"{source}: schema mismatch: unexpected columns {sorted(extra)}")
    return codec


def _decode_logits(column: pa.ListArray, row_entry_offsets: np.ndarray, source: str) -> np.ndarray | None:
    """Flat logits aligned with the top-k entries (NaN for rows without), or None when no row has any."""
    if column.null_count == len(column):
        return None
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)[valid]
    expected = np.diff(row_entry_offsets)[valid]
    if not np.array_equal(lengths, expected):
        raise ShardError(f"{source}: topk_logits do not match topk_k (damaged shard)")
    logits = np.full(int(row_entry_offsets[-1]), np.nan, dtype=np.float32)
    values = column.values.to_numpy(zero_copy_only=False)
    logits[concat_ranges(row_entry_offsets[:-1][valid], lengths)] = values[
        concat_ranges(offsets[:-1][valid], lengths)
    ]
    return logits


def table_to_arrays(table: pa.Table, source: str) -> ShardArrays:
    """Decode a shard table (already schema-checked) into flat arrays; ids stay shard ranks."""
    codec, params = codec_of(table.schema, source)
    vocab_ids, vocab_table = decode_vocab(table.schema.metadata[META_VOCAB], source)
    k, row_offsets = per_position(table.column("topk_k"))
    entry_offsets = segment_starts(k)
    topk_ids = from_planes(table.column("topk_ids"))
    if codec == "q16":
        values = from_planes(table.column("topk_logprobs"))
    else:
        values, _ = _flat_values(table.column("topk_logprobs"), None)
    if codec == "q16" and "topk_tail" not in table.column_names:
        raise ShardError(f"{source}: q16 shard without its topk_tail column")
    tail = per_position(table.column("topk_tail"))[0] if codec == "q16" else None
    if len(topk_ids) != entry_offsets[-1] or len(values) != entry_offsets[-1]:
        raise ShardError(f"{source}: top-k columns disagree with topk_k (damaged shard)")
    logprobs = decode_logprobs(codec, values, tail, k, params)

    token_rank = per_position(table.column("token_rank"))[0]
    other, _ = _flat_values(table.column("token_other"), np.int64)
    in_topk = token_rank != NOT_IN_TOPK
    tokens = np.empty(len(token_rank), dtype=np.int64)
    tokens[in_topk] = topk_ids[entry_offsets[:-1][in_topk] + token_rank[in_topk]]
    if int((~in_topk).sum()) != len(other):
        raise ShardError(f"{source}: token_other does not match token_rank (damaged shard)")
    tokens[~in_topk] = other
    if tokens.size and (tokens.max() >= len(vocab_ids) or topk_ids.max(initial=0) >= len(vocab_ids)):
        raise ShardError(f"{source}: ids beyond the shard's vocabulary table (damaged shard)")

    logits = None
    if "topk_logits" in table.column_names:
        logits = _decode_logits(one_array(table.column("topk_logits")), entry_offsets[row_offsets], source)
    token_logprobs = None
    if "token_logprob" in table.column_names:
        bits = per_position(table.column("token_logprob"))[0]
        if len(bits) != len(tokens):
            raise ShardError(f"{source}: token_logprob does not match token_rank (damaged shard)")
        token_logprobs = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    sample_offsets = sample_ids = sample_counts = None
    if "sample_n" in table.column_names:
        sample_n = per_position(table.column("sample_n"))[0]
        sample_offsets = segment_starts(sample_n)
        sample_ids = from_planes(table.column("sample_ids"))
        sample_counts = from_planes(table.column("sample_counts"))
        if len(sample_n) != len(tokens) or not len(sample_ids) == len(sample_counts) == sample_offsets[-1]:
            raise ShardError(f"{source}: sample columns disagree with each other (damaged shard)")
        if sample_ids.size and sample_ids.max() >= len(vocab_ids):
            raise ShardError(f"{source}: sample ids beyond the shard's vocabulary table (damaged shard)")
    return ShardArrays(
        table=table.select([c for c in METADATA_COLUMNS if c in table.column_names]),
        row_offsets=row_offsets,
        tokens=tokens,
        entry_offsets=entry_offsets,
        topk_ids=topk_ids,
        topk_logprobs=logprobs,
        topk_logits=logits,
        vocab_ids=vocab_ids,
        vocab_table=vocab_table,
        token_logprobs=token_logprobs,
        sample_offsets=sample_offsets,
        sample_ids=sample_ids,
        sample_counts=sample_counts,
    )


def arrays_to_records(arrays: ShardArrays) -> list[TopKRecord]:
    """Rebuild ``TopKRecord``s (teacher ids, padded to each record's max k) from decoded shard arrays."""
    meta = arrays.table.to_pylist()
    k = arrays.k
    spelled = _token_text(*binary_buffers(arrays.vocab_table), arrays.tokens, np.diff(arrays.row_offsets))
    records = []
    for row, m in enumerate(meta):
        p0, p1 = int(arrays.row_offsets[row]), int(arrays.row_offsets[row + 1])
        kr = k[p0:p1]
        width = int(kr.max()) if len(kr) else 0
        valid = np.arange(width)[None, :] < kr[:, None]
        e0, e1 = int(arrays.entry_offsets[p0]), int(arrays.entry_offsets[p1])
        ids = np.full((p1 - p0, width), -1, dtype=np.int32)
        ids[valid] = arrays.vocab_ids[arrays.topk_ids[e0:e1]]
        logprobs = np.full((p1 - p0, width), -np.inf, dtype=np.float32)
        logprobs[valid] = arrays.topk_logprobs[e0:e1]
        logits = None
        if arrays.topk_logits is not None and not np.isnan(arrays.topk_logits[e0:e1]).all():
            logits = np.full((p1 - p0, width), np.nan, dtype=np.float32)
            logits[valid] = arrays.topk_logits[e0:e1]
        token_logprobs = None
        if arrays.token_logprobs is not None and not np.isnan(arrays.token_logprobs[p0:p1]).all():
            token_logprobs = arrays.token_logprobs[p0:p1].copy()
        records.append(
            TopKRecord(
                sample_id=m["sample_id"],
                split=m["split"],
                teacher=m["teacher"],
                mode=m["mode"],
                prompt=m["prompt"],
                text=spelled[row].decode("utf-8") if m["text"] is None else m["text"],
                tokens=arrays.vocab_ids[arrays.tokens[p0:p1]].astype(np.int32),
                topk_ids=ids,
                topk_logprobs=logprobs,
                params=json.loads(m["params"]),
                created_at=m["created_at"],
                prompt_tokens=m["prompt_tokens"],
                completion_tokens=m["completion_tokens"],
                finish_reason=m["finish_reason"],
                topk_logits=logits,
                token_logprobs=token_logprobs,
                **_record_samples(arrays, p0, p1),
            )
        )
    return records


def _record_samples(arrays: ShardArrays, p0: int, p1: int) -> dict[str, np.ndarray]:
    """``sample_ids`` / ``sample_counts`` of positions ``p0:p1`` padded to their widest position (teacher
    ids), or nothing when none of them has a sample."""
    if arrays.sample_offsets is None or arrays.sample_offsets[p1] == arrays.sample_offsets[p0]:
        return {}
    n = np.diff(arrays.sample_offsets[p0 : p1 + 1])
    valid = np.arange(int(n.max()))[None, :] < n[:, None]
    s0, s1 = int(arrays.sample_offsets[p0]), int(arrays.sample_offsets[p1])
    ids = np.full(valid.shape, -1, np.int32)
    ids[valid] = arrays.vocab_ids[arrays.sample_ids[s0:s1]]
    counts = np.zeros(valid.shape, np.int32)
    counts[valid] = arrays.sample_counts[s0:s1]
    return {"sample_ids": ids, "sample_counts": counts}
