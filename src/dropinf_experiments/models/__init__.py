"""Model builders and trainers used by the demo and the experiments."""
