"""The `dropinf` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dropinf",
        description="Training-data attribution with dropout-compressed influence functions. "
                    "Scores are (n_query, n_train) arrays; I(q,i) = -g_q^T H^-1 g_i > 0 means "
                    "training example i is harmful to query q (up-weighting it raises q's loss).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="mislabeled-data detection on real data (sklearn digits, 20%% labels "
                                       "flipped): AUC table for Orig / Gaussian / Dropout with seconds")
    demo.add_argument("--out", default="dropinf-demo", help="report folder (default: %(default)s)")
    demo.add_argument("--r", type=int, default=64, help="coordinates kept per layer (default: %(default)s)")
    demo.add_argument("--seeds", type=int, default=5, help="runs per compressed method (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from .eval.demo import run_demo
        run_demo(out=args.out, r=args.r, seeds=args.seeds, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
