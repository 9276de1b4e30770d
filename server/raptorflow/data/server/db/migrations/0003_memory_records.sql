-- Memory records (MemorySyncService.UpsertMemoryRecords and SearchMemoryRecords),
-- one row per (workspace, id). The embedding is kept as real[] so every
-- float32 component round-trips exactly with or without pgvector; search with
-- pgvector reads the generated vector column below, and without it computes
-- cosine in SQL over the array.
CREATE TABLE raptorflow_data.memory_records (
    workspace_id uuid NOT NULL,
    id text NOT NULL CONSTRAINT memory_records_id_length
        CHECK (char_length(id) BETWEEN 1 AND 256),
    kind text NOT NULL CONSTRAINT memory_records_kind_length
        CHECK (char_length(kind) BETWEEN 1 AND 64),
    -- NULL when the record has none (an empty string in the API).
    content text,
    -- NULL when the record has no metadata; otherwise a JSON object.
    metadata jsonb CONSTRAINT memory_records_metadata_object
        CHECK (metadata IS NULL OR jsonb_typeof(metadata) = 'object'),
    source_table text,
    source_row_id text,
    embedding real[] NOT NULL CONSTRAINT memory_records_embedding_shape CHECK (
        array_ndims(embedding) = 1
        AND cardinality(embedding) BETWEEN 1 AND 16000
        AND array_position(embedding, NULL) IS NULL
        -- NaN = NaN holds for PostgreSQL floats, so overlap finds non-finite components.
        AND NOT embedding && '{NaN,Infinity,-Infinity}'::real[]
    ),
    -- Search compares only records of the query's dimension; this finds them
    -- without reading (and detoasting) the embedding itself.
    embedding_dimension integer GENERATED ALWAYS AS (cardinality(embedding)) STORED,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, id)
);

-- DeleteMemoryRecords by source row: a sync consumer removes the records of
-- each deleted row, so this lookup must not scan the workspace's records.
CREATE INDEX memory_records_source ON raptorflow_data.memory_records
    (workspace_id, source_table, source_row_id)
    WHERE source_row_id IS NOT NULL;

-- pgvector is optional. When the server has it, create it (a superuser owner
-- can; pgvector is not a trusted extension) and add a vector copy of the
-- embedding that PostgreSQL keeps in step. When it cannot be had, the table
-- works as it is and search uses the exact SQL fallback. Installing pgvector
-- later does not add the column retroactively.
DO $migration$
DECLARE
    vector_schema name;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_available_extensions WHERE name = 'vector') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS vector;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'pgvector is available, but this role may not create it';
        END;
    END IF;
    SELECT n.nspname INTO vector_schema
    FROM pg_catalog.pg_extension AS e
    JOIN pg_catalog.pg_namespace AS n ON n.oid = e.extnamespace
    WHERE e.extname = 'vector';
    IF vector_schema IS NOT NULL THEN
        BEGIN
            EXECUTE format(
                'ALTER TABLE raptorflow_data.memory_records ADD COLUMN embedding_vector %1$I.vector'
                ' GENERATED ALWAYS AS (embedding::%1$I.vector) STORED',
                vector_schema
            );
        EXCEPTION WHEN undefined_function OR cannot_coerce OR undefined_object THEN
            -- A pgvector too old to cast real[] to vector.
            RAISE NOTICE 'this pgvector cannot cast real[] to vector';
        END;
    END IF;
END
$migration$;
