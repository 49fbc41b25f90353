"""The paper's experiments on real models and data: `dropinf reproduce NAME [--smoke | --full]`."""

EXPERIMENTS = ("mislabel", "retrain-images", "retrain-lm", "r-sweep", "timing")
