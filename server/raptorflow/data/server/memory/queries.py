"""The SQL of the memory store: batched upsert and delete, exact cosine search (pgvector or not).

Every value is bound; the only text put into a statement is the schema of the
pgvector extension, read from the catalog at start-up and quoted.

Similarity is defined by one SQL expression, `_RESCORE`: the dot product and
both squared norms summed in float8 in component order, then
dot / sqrt(norm_sq * query_norm_sq), clamped to [-1, 1]. Float32 components
never overflow or underflow in float8 at up to 16,000 dimensions, so it is
exact to float8 rounding for every stored embedding. Both search statements
end in it, so they return the same records with the same similarities:

- `SEARCH_SQL` (no pgvector) scores every record of the query's dimension.
- `vector_search_sql` ranks records with pgvector's `<=>` in C first. pgvector
  accumulates in float32, so its cosine can be off by up to about
  2·n·2^-24 (`float32_cosine_error`) and, for norms outside
  `FLOAT32_SAFE_NORMS`, overflows or underflows (1e30 components look
  orthogonal, 1e-30 ones identical). So `<=>` only preselects: the records
  within twice that error of the k-th best, plus every record whose norm is
  outside the safe range, are rescored by `_RESCORE`. A record left out is
  beaten by at least k others by more than the error, so the top k are exact.
"""

from __future__ import annotations

from raptorflow.data.server.db.catalog import quote_ident

# Norms (float8, as pgvector's vector_norm computes them) for which pgvector's
# float32 sums cannot overflow (norm² ≤ 1e30 ≪ 3.4e38, and every partial sum
# of squares or products is at most the norm product) and lose only negligibly
# to underflow (at most n·2^-126 absolute, against a norm product ≥ 1e-12).
FLOAT32_SAFE_NORMS = (1e-6, 1e15)

_FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def float32_cosine_error(dimension: int) -> float:
    """A bound on |pgvector's float32 cosine - the exact cosine| for norms in the safe range.

    Each float32 sum of n products is within g·sum|a_i·b_i| <= g·|a|·|b| of its
    exact value, where g = n·u / (1 - n·u) and u = 2^-24 (any summation order),
    and so are both squared norms; the quotient is then within 2g / (1 - g).
    The constant covers pgvector's float8 division and our 1 - distance.
    """
    n_u = dimension * _FLOAT32_UNIT_ROUNDOFF
    gamma = n_u / (1.0 - n_u)
    return 2.0 * gamma / (1.0 - gamma) + 1e-9


# $1 workspace_id uuid, $2..$9 parallel arrays (one element per record, sorted
# by id so concurrent batches lock rows in the same order), $10 every
# embedding's components concatenated; record i's are $10[start+1 : start+dim].
UPSERT_SQL = """
INSERT INTO raptorflow_data.memory_records AS m
    (workspace_id, id, kind, content, metadata, source_table, source_row_id, embedding)
SELECT $1::uuid, r.id, r.kind, r.content, r.metadata::jsonb, r.source_table, r.source_row_id,
       ($10::real[])[r.start + 1 : r.start + r.dimension]
FROM unnest(
    $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::integer[], $9::integer[]
) AS r(id, kind, content, metadata, source_table, source_row_id, start, dimension)
ON CONFLICT (workspace_id, id) DO UPDATE SET
    kind = EXCLUDED.kind,
    content = EXCLUDED.content,
    metadata = EXCLUDED.metadata,
    source_table = EXCLUDED.source_table,
    source_row_id = EXCLUDED.source_row_id,
    embedding = EXCLUDED.embedding,
    updated_at = now()
RETURNING (m.xmax = 0) AS inserted
"""

# $1 workspace_id uuid, $2 record ids text[] (may be empty), $3 source_table
# text or NULL, $4 source row ids text[] (may be empty). The records are
# locked in id code point order (COLLATE "C", as Python sorts the upsert's
# ids) before they are deleted, so a delete and an upsert that share records
# wait for each other instead of deadlocking. A record already gone is
# skipped, which makes the statement idempotent.
DELETE_SQL = """
WITH doomed AS (
    SELECT m.id
    FROM raptorflow_data.memory_records AS m
    WHERE m.workspace_id = $1::uuid
      AND (
        m.id = ANY ($2::text[])
        OR (m.source_table = $3::text AND m.source_row_id = ANY ($4::text[]))
      )
    ORDER BY m.id COLLATE "C"
    FOR UPDATE
),
deleted AS (
    DELETE FROM raptorflow_data.memory_records AS m
    USING doomed
    WHERE m.workspace_id = $1::uuid AND m.id = doomed.id
    RETURNING 1
)
SELECT count(*) FROM deleted
"""

# Search parameters: $1 workspace_id uuid, $2 query embedding real[], $3 kinds
# text[] or NULL, $4 source_table or NULL, $5 metadata_contains jsonb or NULL,
# $6 top_k; pgvector only: $7 the preselection margin in cosine distance.


def _query_cte(vector_type: str = "") -> str:
    """The query embedding once: as real[], its squared norm and, with pgvector, as a vector."""
    vector = f",\n           $2::real[]::{vector_type} AS vector" if vector_type else ""
    return f"""query AS (
    SELECT $2::real[] AS embedding,
           (SELECT sum(c::float8 * c::float8) FROM unnest($2::real[]) AS c) AS norm_sq{vector}
)"""


# The records of the workspace that the filters let through, of the query's dimension.
_SCOPE = """
    m.workspace_id = $1::uuid
    AND m.embedding_dimension = cardinality($2::real[])
    AND ($3::text[] IS NULL OR m.kind = ANY ($3::text[]))
    AND ($4::text IS NULL OR m.source_table = $4::text)
    AND ($5::jsonb IS NULL OR coalesce(m.metadata, '{}'::jsonb) @> $5::jsonb)"""

_RECORD_COLUMNS = (
    "m.id, m.kind, m.content, m.metadata, m.source_table, m.source_row_id, m.embedding"
)

# The exact similarity of each candidate, and the top k. Zero vectors have no
# direction, so no similarity: they are skipped.
_RESCORE = """
SELECT m.id, m.kind, m.content, m.metadata::text AS metadata, m.source_table, m.source_row_id,
       m.embedding, s.similarity
FROM candidates AS m
CROSS JOIN query
CROSS JOIN LATERAL (
    SELECT sum(e::float8 * q::float8) AS dot, sum(e::float8 * e::float8) AS norm_sq
    FROM unnest(m.embedding, query.embedding) AS u(e, q)
) AS p
CROSS JOIN LATERAL (
    SELECT greatest(-1::float8, least(1::float8, p.dot / sqrt(p.norm_sq * query.norm_sq)))
        AS similarity
) AS s
WHERE p.norm_sq > 0
ORDER BY s.similarity DESC, m.id COLLATE "C"
LIMIT $6::integer
"""

SEARCH_SQL = f"""
WITH {_query_cte()},
candidates AS (
    SELECT {_RECORD_COLUMNS}
    FROM raptorflow_data.memory_records AS m
    WHERE {_SCOPE}
)
{_RESCORE}"""

# Which schema holds the vector type of the generated column, if there is one.
VECTOR_COLUMN_SQL = """
SELECT n.nspname
FROM pg_catalog.pg_attribute AS a
JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid
JOIN pg_catalog.pg_namespace AS n ON n.oid = t.typnamespace
WHERE a.attrelid = to_regclass('raptorflow_data.memory_records')
  AND a.attname = 'embedding_vector'
  AND NOT a.attisdropped
  AND t.typname = 'vector'
"""


def vector_probe_sql(schema: str) -> str:
    """A statement that answers 6 when pgvector's cast, `<=>` and norm work for the query role."""
    s = quote_ident(schema)
    return f"""
SELECT ('{{1,0}}'::real[]::{s}.vector OPERATOR({s}.<=>) '{{0,1}}'::real[]::{s}.vector)
       + {s}.vector_norm('{{3,4}}'::real[]::{s}.vector)
"""


def vector_search_sql(schema: str) -> str:
    """The search statement that preselects with pgvector (the extension in `schema`)."""
    s = quote_ident(schema)
    low, high = FLOAT32_SAFE_NORMS
    return f"""
WITH {_query_cte(f"{s}.vector")},
scope AS MATERIALIZED (
    SELECT m.id,
           m.embedding_vector OPERATOR({s}.<=>) query.vector AS distance,
           {s}.vector_norm(m.embedding_vector) AS norm
    FROM raptorflow_data.memory_records AS m
    CROSS JOIN query
    WHERE {_SCOPE}
),
threshold AS (
    SELECT scope.distance
    FROM scope
    WHERE scope.norm BETWEEN {low!r}::float8 AND {high!r}::float8
    ORDER BY scope.distance
    OFFSET $6::integer - 1
    LIMIT 1
),
candidates AS (
    SELECT {_RECORD_COLUMNS}
    FROM raptorflow_data.memory_records AS m
    WHERE m.workspace_id = $1::uuid
      AND m.id IN (
        SELECT scope.id
        FROM scope
        WHERE scope.norm > 0
          AND (
            scope.norm NOT BETWEEN {low!r}::float8 AND {high!r}::float8
            OR scope.distance
                <= coalesce((SELECT threshold.distance FROM threshold), 'Infinity') + $7::float8
          )
      )
)
{_RESCORE}"""
