"""The one Arrow schema module: every stage reads and writes these.

Bump ``SCHEMA_VERSION`` on any change to a schema below; the manifest records it so readers can
refuse data they do not understand.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

# The query list (tasks/queries/). One row per query.
QUERY_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.int32(), nullable=False),
        pa.field("query", pa.string(), nullable=False),  # normalised: lower-case, single spaces
        pa.field("source", pa.string(), nullable=False),  # unigram | bigram | title | wordnet
        pa.field("count", pa.int64()),  # unigram/bigram corpus count
        pa.field("pmi", pa.float64()),  # bigrams
        pa.field("views", pa.int64()),  # titles
    ],
    metadata={"witflow.schema_version": str(SCHEMA_VERSION), "witflow.table": "queries"},
)

# The bundled Openclipart sample and the full Debian-built source (infra/openclipart.py).
OPENCLIPART_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # relative path under /usr/share/openclipart/
        pa.field("category", pa.string(), nullable=False),  # top folder under svg/
        pa.field("title", pa.string(), nullable=False),  # as written ("" when the SVG has none)
        pa.field("keywords", pa.list_(pa.string()), nullable=False),
        pa.field("description", pa.string()),  # null when empty
        pa.field("image", pa.binary(), nullable=False),  # RGB PNG, longest side <= max_side
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ],
    metadata={"witflow.schema_version": str(SCHEMA_VERSION), "witflow.table": "openclipart"},
)

# Emoji sets from npm packages (infra/emoji.py). One row per emoji a vendor draws.
EMOJI_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # "<vendor>/<code points>", e.g. "twitter/1F431"
        pa.field("unified", pa.string(), nullable=False),  # code points, upper-case hex joined by "-"
        pa.field("vendor", pa.string(), nullable=False),  # infra.emoji.VENDORS: twitter | google | openmoji | fluent
        pa.field("name", pa.string(), nullable=False),  # CLDR English name ("cat face")
        pa.field("keywords", pa.list_(pa.string()), nullable=False),  # CLDR English keywords
        pa.field("category", pa.string(), nullable=False),
        pa.field("subcategory", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # RGB PNG on white, 64 px
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ],
    metadata={"witflow.schema_version": str(SCHEMA_VERSION), "witflow.table": "emoji"},
)

# Candidate (image, caption) pairs as readers produce them and stages pass them on.
# Stages add columns (query_ids, width, ...) as they go; `SHARD_SCHEMA` is the final shape.
CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),  # stable across reruns
        pa.field("source", pa.string(), nullable=False),  # which input it came from
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),  # http(s) URL to fetch, if any
        pa.field("image", pa.binary()),  # encoded image bytes, if inline or fetched
        pa.field("meta", pa.string()),  # JSON: source-specific metadata (title, keywords, ...)
    ],
    metadata={"witflow.schema_version": str(SCHEMA_VERSION), "witflow.table": "candidates"},
)

# Rows of the dataset's Parquet shards.
SHARD_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("image_bytes", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("phash", pa.uint64()),
        pa.field("query_ids", pa.list_(pa.int32())),
        pa.field("meta", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ],
    metadata={"witflow.schema_version": str(SCHEMA_VERSION), "witflow.table": "shard"},
)

# Funnel statistics: one row per (stage, reason).
STATS_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # "in", "out", or a drop reason
        pa.field("count", pa.int64(), nullable=False),
    ],
    metadata={"witflow.schema_version": str(SCHEMA_VERSION), "witflow.table": "stats"},
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table``'s columns to ``schema`` (missing nullable columns become nulls)."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        elif f.nullable:
            cols.append(pa.nulls(table.num_rows, f.type))
        else:
            raise ValueError(f"column {f.name!r} is required by the {schema.metadata[b'witflow.table'].decode()} schema")
    return pa.Table.from_arrays(cols, schema=schema)
