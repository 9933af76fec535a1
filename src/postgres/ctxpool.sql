-- ctxpool's SQL helpers for Row-Level Security policies.
-- Install with ctxpool::postgres::install_helpers (as a role that may create schemas).
-- Every helper returns NULL when no context is set, so that a policy built on them denies:
-- a custom setting reads NULL before it is ever set and '' after a reset; both mean "none".

CREATE SCHEMA IF NOT EXISTS ctxpool;
GRANT USAGE ON SCHEMA ctxpool TO PUBLIC;

-- The end user of the context: the application-store name or the token's subject.
CREATE OR REPLACE FUNCTION ctxpool.end_user() RETURNS text
LANGUAGE sql STABLE AS $$
  SELECT nullif(current_setting('ctxpool.end_user', true), '')
$$;

-- Whether the context carries the data role; NULL without a context.
CREATE OR REPLACE FUNCTION ctxpool.has_data_role(role text) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT CASE
    WHEN nullif(current_setting('ctxpool.data_roles', true), '') IS NULL THEN NULL
    ELSE current_setting('ctxpool.data_roles', true)::jsonb ? role
  END
$$;

-- One attribute of a `schema.context`, as text; NULL when absent or without a context.
CREATE OR REPLACE FUNCTION ctxpool.attr(ctx text, key text) RETURNS text
LANGUAGE sql STABLE AS $$
  SELECT nullif(current_setting(ctx || '.' || key, true), '')
$$;

GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA ctxpool TO PUBLIC;
