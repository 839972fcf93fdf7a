-- A one-time code is one-time: remember the last accepted time step per account and
-- refuse codes of that step or earlier (RFC 6238 §5.2).
ALTER TABLE users ADD COLUMN totp_last_step bigint;
ALTER TABLE platform_staff ADD COLUMN totp_last_step bigint;
