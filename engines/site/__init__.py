"""The `site` engine: nginx server blocks, ACME certificates and FTP accounts per site."""

from engines.site.config import SiteSettings
from engines.site.engine import SiteEngine

__all__ = ["SiteEngine", "SiteSettings"]
