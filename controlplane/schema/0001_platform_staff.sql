-- Platform staff (the NOC): a principal kind distinct from tenant users.
-- The first one is created by `yakpanel up` and its password shown once.
CREATE TABLE platform_staff (
    id uuid PRIMARY KEY,
    email text NOT NULL,
    password_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz,
    CONSTRAINT platform_staff_email_lower CHECK (email = lower(email))
);
CREATE UNIQUE INDEX platform_staff_email ON platform_staff (email);
