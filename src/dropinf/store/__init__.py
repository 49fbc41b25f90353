"""Where features live: in memory (Features); the on-disk store comes with issue 5."""

from .features import Features, check_compatible

__all__ = ["Features", "check_compatible"]
