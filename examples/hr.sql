-- A working database set-up for ctxpool on PostgreSQL: the HR schema of the README, the
-- demo and the tests. Run it as a superuser in an empty database, after ctxpool's helpers:
--
--   psql -d hr -f src/postgres/ctxpool.sql -f examples/hr.sql
--
-- (or `ctxpool::postgres::install_helpers` instead of the first file). Each part below is
-- one thing every ctxpool database needs; adapt the names, keep the shape.

-- 1. The pool's one login. Not a superuser, no BYPASSRLS, and it owns no table (an owner
--    is exempt from Row-Level Security unless the table is FORCEd).
CREATE ROLE hr_app LOGIN;

-- 2. The data roles the pool may switch to. Each is NOLOGIN and granted to the login:
--    `SET ROLE` (which the context does) is only allowed into a role the login is a
--    member of. The same names go into the pool's allow-list, `ContextConfig::new(..)`.
CREATE ROLE hr_employee NOLOGIN;
CREATE ROLE hr_manager NOLOGIN;
CREATE ROLE hr_auditor NOLOGIN;            -- exists, but NOT granted to hr_app: refused
GRANT hr_employee, hr_manager TO hr_app;

-- 3. The tables, owned by the superuser running this file, with Row-Level Security on.
CREATE SCHEMA hr;
GRANT USAGE ON SCHEMA hr TO hr_app, hr_employee, hr_manager, hr_auditor;
CREATE TABLE hr.employees (
  id int PRIMARY KEY,
  name text NOT NULL,
  org_id int NOT NULL,
  salary int NOT NULL
);
CREATE TABLE hr.audit (who text, what text);
INSERT INTO hr.employees VALUES
  (1, 'Ada', 5, 5000), (2, 'Grace', 5, 5200), (3, 'Alan', 5, 4800),
  (4, 'Edsger', 7, 6100), (5, 'Barbara', 7, 5900), (6, 'Donald', 9, 7000);
ALTER TABLE hr.employees ENABLE ROW LEVEL SECURITY;
ALTER TABLE hr.audit ENABLE ROW LEVEL SECURITY;

-- 4. Privileges: what each role may touch at all. The login may read the tables, but no
--    policy names it: without a context it sees no row, and no error.
GRANT SELECT ON hr.employees TO hr_app, hr_employee, hr_manager;
GRANT UPDATE (salary) ON hr.employees TO hr_manager;
GRANT SELECT, INSERT ON hr.audit TO hr_app, hr_employee, hr_manager, hr_auditor;

-- 5. Policies, one per pattern. Each reads the context through the helpers, which return
--    NULL without a context, so every comparison below is then NULL: the row is denied.

-- Pattern: a row that belongs to the end user, matched on an attribute of the context.
CREATE POLICY employee_self ON hr.employees FOR SELECT TO hr_employee
  USING (id = ctxpool.attr('hr.hcm_context', 'emp_id')::int);

-- Pattern: what a database role may see, narrowed by an attribute (a manager, their
-- organisation). The context's role is the session role, so `TO hr_manager` selects it.
CREATE POLICY manager_org ON hr.employees FOR SELECT TO hr_manager
  USING (org_id = ctxpool.attr('hr.hcm_context', 'org_id')::int);
CREATE POLICY manager_raise ON hr.employees FOR UPDATE TO hr_manager
  USING (org_id = ctxpool.attr('hr.hcm_context', 'org_id')::int);

-- Pattern: anyone with a context, whatever the role: audit rows are written by every end
-- user and read by nobody but superusers.
CREATE POLICY audit_write ON hr.audit FOR INSERT WITH CHECK (ctxpool.end_user() IS NOT NULL);

-- Pattern: a data role that is a flag, not a database role. While the application enables
-- hr_directory for a request, an employee also sees the rows of their organisation (the
-- example service's /colleagues).
CREATE POLICY employee_directory ON hr.employees FOR SELECT TO hr_employee
  USING (ctxpool.has_data_role('hr_directory')
         AND org_id = ctxpool.attr('hr.hcm_context', 'org_id')::int);
