-- The HR schema of the tests and the demo: employees by organisation, Row-Level Security
-- policies written against ctxpool's settings. Run as a superuser after the helpers.
CREATE ROLE hr_app LOGIN;                  -- the pool's one least-privileged login
CREATE ROLE hr_employee NOLOGIN;           -- data roles an end user may run as
CREATE ROLE hr_manager NOLOGIN;
CREATE ROLE hr_auditor NOLOGIN;            -- exists, but NOT granted to hr_app
GRANT hr_employee, hr_manager TO hr_app;

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
-- The login sees the tables but no policy lets it see a row: no identity, no rows.
GRANT SELECT ON hr.employees TO hr_app, hr_employee, hr_manager;
GRANT UPDATE (salary) ON hr.employees TO hr_manager;
GRANT SELECT, INSERT ON hr.audit TO hr_app, hr_employee, hr_manager, hr_auditor;
-- An employee sees their own row; a manager their organisation.
CREATE POLICY employee_self ON hr.employees FOR SELECT TO hr_employee
  USING (id = ctxpool.attr('hr.hcm_context', 'emp_id')::int);
CREATE POLICY manager_org ON hr.employees FOR SELECT TO hr_manager
  USING (org_id = ctxpool.attr('hr.hcm_context', 'org_id')::int);
CREATE POLICY manager_raise ON hr.employees FOR UPDATE TO hr_manager
  USING (org_id = ctxpool.attr('hr.hcm_context', 'org_id')::int);
-- Audit rows are written by anyone with a context and read by nobody but superusers.
CREATE POLICY audit_write ON hr.audit FOR INSERT WITH CHECK (ctxpool.end_user() IS NOT NULL);
-- A scoped elevation: while the application enables the data role hr_directory for a
-- request, an employee also sees the rows of their organisation (the example service's
-- /colleagues; the data role is a flag read here, not a database role).
CREATE POLICY employee_directory ON hr.employees FOR SELECT TO hr_employee
  USING (ctxpool.has_data_role('hr_directory')
         AND org_id = ctxpool.attr('hr.hcm_context', 'org_id')::int);
