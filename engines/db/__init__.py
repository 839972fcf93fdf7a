"""The `db` engine: MariaDB databases and users, Redis ACL users (`engines.db:DbEngine`)."""

from engines.db.config import DbSettings, DbSettingsError
from engines.db.engine import DbEngine

__all__ = ["DbEngine", "DbSettings", "DbSettingsError"]
