"""YakPanel shared kernel: settings, ids, clock, logging, topic catalogue, CLI, supervisor."""

__version__ = "0.1.0"
