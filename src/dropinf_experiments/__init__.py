"""The paper's experiments, the demo, and the offline real-data loaders and model builders they
use. Beside the library, not part of its core: ``pip install 'dropinf[experiments]'`` brings
what they need (scikit-learn, scipy, matplotlib, transformers, peft, ...); ``import dropinf``
never imports this package.

Each experiment module has ``run(preset, out, progress)`` and is reached from the command line
as ``dropinf reproduce NAME`` (``dropinf demo`` runs ``mislabel`` at its fast preset).
"""

EXPERIMENTS = ("mislabel", "retrain-images", "retrain-lm", "r-sweep", "timing")
