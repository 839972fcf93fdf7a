"""Identity and access: principals, permissions, the policy point, credentials."""
