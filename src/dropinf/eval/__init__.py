"""Evaluation: metrics and the runs that turn the library into evidence."""
