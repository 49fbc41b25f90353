"""Where features live: in memory (Features), on disk (disk.FeatureStore), and the Featurizer that
makes them (featurizer.py); both kinds of rows meet the RowSource seam (features.RowSource)."""

from .features import Features, RowSource, check_compatible, check_signatures

__all__ = ["Features", "RowSource", "check_compatible", "check_signatures"]
