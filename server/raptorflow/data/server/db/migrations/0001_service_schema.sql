-- The service's own schema. Later migrations add its tables here (change log,
-- jobs); callers' tables stay where they are and are only read through the catalog.
CREATE SCHEMA IF NOT EXISTS raptorflow_data;
REVOKE ALL ON SCHEMA raptorflow_data FROM PUBLIC;
