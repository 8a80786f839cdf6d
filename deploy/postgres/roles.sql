-- Arbiter's PostgreSQL roles, least privilege (README "Running in production"):
--
--   arbiter_owner   owns the database and every table: `arbiter migrate` runs as it (DDL)
--   arbiter_worker  `arbiter worker` (and `limits set/rm`): reads and writes rows, no DDL,
--                   no TRUNCATE, no temporary tables
--   arbiter_reader  `runs show`, `proposals show`, `limits ls`: SELECT only
--
-- Run it as a superuser in the application's database, before or after the first migration;
-- running it again changes nothing. It sets no passwords (deploy/postgres/init-passwords.sh
-- does, from the environment). Plain SQL, no psql meta-commands, so any client can run it.

DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['arbiter_owner', 'arbiter_worker', 'arbiter_reader'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) THEN
            EXECUTE format('CREATE ROLE %I LOGIN', name);
        END IF;
    END LOOP;
END
$$;

-- The owner owns the database, and so (through pg_database_owner) its public schema: it may
-- create tables there. Nobody else may connect but the two roles, nor create anything: not
-- in the schema, and no temporary tables (PUBLIC's default TEMPORARY right is revoked too).
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I OWNER TO arbiter_owner', current_database());
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format(
        'GRANT CONNECT ON DATABASE %I TO arbiter_worker, arbiter_reader', current_database()
    );
END
$$;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO arbiter_worker, arbiter_reader;

-- Tables and identity sequences the owner creates later (every migration) get the grants
-- by themselves...
ALTER DEFAULT PRIVILEGES FOR ROLE arbiter_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO arbiter_worker;
ALTER DEFAULT PRIVILEGES FOR ROLE arbiter_owner IN SCHEMA public
    GRANT USAGE ON SEQUENCES TO arbiter_worker;
ALTER DEFAULT PRIVILEGES FOR ROLE arbiter_owner IN SCHEMA public
    GRANT SELECT ON TABLES TO arbiter_reader;

-- ...and those already there (the script run after a migration) get them now.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO arbiter_worker;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO arbiter_worker;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO arbiter_reader;
