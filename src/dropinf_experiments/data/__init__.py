"""Offline dataset loaders used by the demo and the experiments."""
