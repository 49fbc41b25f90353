"""The `dropinf` command."""

from __future__ import annotations

import argparse
import json
import sys

SIGN = ("Scores are (n_query, n_train) arrays; I(q,i) = -g_q^T H^-1 g_i > 0 means training example i "
        "is harmful to query q (up-weighting it raises q's loss), < 0 means it helps.")


def _compressor(a):
    from .methods import COMPRESSORS, default_setting
    from .options import build
    if a.compressor == "dropout":        # the measured default (head_factor=4); flags given still apply to it
        return build(COMPRESSORS["dropout"], a, base=default_setting(0)[0])
    return build(COMPRESSORS[a.compressor], a)


def _estimator(a):
    from .methods import ESTIMATORS, default_estimator, mislabel_estimator
    from .options import build
    if a.estimator is None:              # the measured default; flags given still apply to it
        base = default_estimator(None)
        if getattr(a, "member_size", None) and getattr(a, "members", None) is None:
            base = mislabel_estimator(None)     # --member-size replaces the default's members: the mislabel estimator
        return build(type(base), a, base=base)
    return build(ESTIMATORS[a.estimator], a)


def _add_estimator(p):
    from .methods import ESTIMATORS
    from .options import add_options
    g = p.add_argument_group("estimator (what stands for H^-1; every option below comes from the estimator "
                             "dataclasses)")
    g.add_argument("--estimator", choices=list(ESTIMATORS), default=None,
                   help="default: dropinf's measured default, gauss-newton with members=4, damping-rn=40 and "
                        "head-damping=0.03 (see "
                        "dropinf.default_setting()); gauss-newton: per-layer damped Gauss-Newton (paper eq. 3) with "
                        "the class's own options (members=1); datainf: "
                        "Sherman-Morrison average (eq. 9-10); lissa: truncated Neumann series (eq. 7-8); "
                        "hessian-free: plain gradient dot product; exact: the true Hessian by autograd, all layers "
                        "jointly (small models only; re-reads the entry's train data)")
    add_options(g, ESTIMATORS)
    from .score import ScoreOptions
    add_options(p.add_argument_group("scoring (from ScoreOptions)"), {"scoring": ScoreOptions})
    p.add_argument("--measure", default="loss",
                   help="the query side's function: 'loss' (default: the training loss) or a name in the entry's "
                        "'measures' dict (e.g. a margin or the log-probability of a completion; see dropinf.measures)")


def _measure(a, task):
    if a.measure == "loss":
        return None
    if a.measure not in task.measures:
        from .errors import ConfigError
        raise ConfigError(f"--measure {a.measure!r}: the entry point defines no such measure; it defines "
                          f"{sorted(task.measures) or 'none'} (return measures={{name: fn}} from it).")
    return task.measures[a.measure]


def _track_item(text: str):
    """One --track item: a module name or glob, or TYPE:GLOB (a torch.nn class name and a glob that
    must both hold, e.g. Linear:model.layers.*)."""
    if ":" not in text:
        return text
    import torch
    tname, pattern = text.split(":", 1)
    cls = getattr(torch.nn, tname, None)
    if not isinstance(cls, type):
        from .errors import ConfigError
        raise ConfigError(f"--track {text!r}: {tname!r} is not a torch.nn module type (e.g. Linear, Conv2d, "
                          f"Embedding)")
    return (cls, pattern)


def _score_options(a):
    from .options import build
    from .score import ScoreOptions
    return build(ScoreOptions, a)


def _experiments():
    try:
        import dropinf_experiments  # noqa: F401
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        from .errors import ConfigError
        raise ConfigError(f"the demo and the paper's experiments need the experiments extra ({exc}). Install it "
                          f"with: pip install 'dropinf[experiments]' (or use `bash run.sh demo`).") from exc


def _add_entry(p, store_help="store folder", queries: bool = True):
    p.add_argument("entry", nargs="?", default=None,
                   help="module:function returning dict(model, loss_fn, train, query, [collate_fn], [batch_size]); "
                        "see dropinf.entry. Or, with no Python file, --model and --data (below)")
    p.add_argument("--store", required=True, help=store_help)
    from .options import add_options
    from .text_task import TextTaskOptions
    g = p.add_argument_group("a Hugging Face causal LM and text files instead of an entry point (from TextTaskOptions)")
    add_options(g, {"text": TextTaskOptions})
    if queries:
        g.add_argument("--prompt", action="append", default=None, help="a query prompt (repeat for several; each "
                                                                       "with its --completion)")
        g.add_argument("--completion", action="append", default=None, help="the completion attributed for the "
                                                                           "--prompt in the same position")


def _task(args):
    """The entry point's Task, or one built from --model/--data (dropinf.text_task)."""
    from .errors import ConfigError
    if args.entry and args.model:
        raise ConfigError("give an entry point (module:function) or --model, not both")
    if args.model:
        from .options import build
        from .text_task import TextTaskOptions, build_task
        return build_task(build(TextTaskOptions, args), getattr(args, "prompt", None), getattr(args, "completion", None))
    if not args.entry:
        raise ConfigError("give an entry point (module:function), or --model FOLDER --data FILE for a Hugging Face "
                          "causal LM and a text file")
    from .entry import load_entry
    return load_entry(args.entry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dropinf",
        description="Training-data attribution with dropout-compressed influence functions. " + SIGN)
    sub = parser.add_subparsers(dest="cmd", required=True)

    demo = sub.add_parser("demo", help="the main job: mislabeled-data detection with a real model on real data "
                                       "(MiniLM-L6 + LoRA on tweets with 20%% of labels flipped) — the `reproduce "
                                       "mislabel` experiment at its fast default; prints the AUC table per method")
    demo.add_argument("--out", default="reports/mislabel", help="report folder (default: %(default)s)")
    demo.add_argument("--digits", action="store_true",
                      help="instead, a 10-second version on sklearn digits with an MLP (Orig / Gaussian / Dropout)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    rp = sub.add_parser("reproduce", help="run one of the paper's experiments and write a report folder "
                                          "(report.md, PNG plots, raw CSV/JSON)")
    rp.add_argument("name", choices=["mislabel", "retrain-images", "retrain-lm", "r-sweep", "timing", "lds", "facts"],
                    help="mislabel: §4.1/Table 1; retrain-images: §4.2.1/Table 2; retrain-lm: §4.2/Tables 3-5; "
                         "r-sweep: §5/Figure 1; timing: Tables 7, 9-11; lds: linear datamodeling score of every method "
                         "at equal bytes on an MLP, a CNN and a transformer LM (retrains from scratch; cached); facts: "
                         "fact tracing on SmolLM2-135M (which training document taught an invented fact?), recall@k "
                         "and MRR per method beside BM25")
    size = rp.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="a few dozen examples: checks the pipeline end to end")
    size.add_argument("--full", action="store_true", help="the paper's scale (hours on a CPU)")
    rp.add_argument("--out", default=None, help="report folder (default: reports/NAME)")
    rp.add_argument("--no-progress", action="store_true", help="hide progress bars")

    fz = sub.add_parser("featurize", help="compress every training example's gradient into an on-disk store "
                                          "(resumable; run under torchrun for several processes)")
    _add_entry(fz, "store folder to create or resume", queries=False)
    from .methods import COMPRESSORS
    from .options import add_options
    cg = fz.add_argument_group("compressor (every option below comes from the compressor dataclasses)")
    cg.add_argument("--compressor", choices=list(COMPRESSORS), default="dropout",
                    help="dropout: r random coordinates per layer (the paper's method; default: r=2048, and 4 x r on the "
                         "model's output layer: --head-factor 4); gaussian: dense "
                         "random projection to r dims; logra: Kronecker projection r_in x r_out; identity: no "
                         "compression (the paper's Orig)")
    add_options(cg, COMPRESSORS)
    fz.add_argument("--track", default=None, help="'all', 'lora', or comma-separated items, each a module name "
                                                   "or glob (that module and what it holds) or TYPE:GLOB (e.g. "
                                                   "Linear:model.layers.*: every nn.Linear inside the decoder "
                                                   "layers); blocks come in model order (default: every Linear)")
    from .store.writer import StoreOptions
    add_options(fz.add_argument_group("store (from StoreOptions)"), {"store": StoreOptions})
    fz.add_argument("--no-progress", action="store_true", help="hide progress bars")

    for name, hlp in (("score", "write the full (n_query, n_train) score matrix to a .npy memmap"),
                      ("topk", "the k most helpful and most harmful training examples per query, as JSON")):
        p = sub.add_parser(name, help=hlp, description=hlp + ". " + SIGN)
        _add_entry(p)
        _add_estimator(p)
        p.add_argument("--reduce", choices=["none", "mean"], default="none",
                       help="mean: one query, the mean query gradient (influence on the mean query loss)")
        p.add_argument("--out", required=(name == "score"), default=None,
                       help="output file (.npy for score, .json for topk; topk prints if omitted)")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        if name == "topk":
            p.add_argument("-k", type=int, default=10, help="examples per side per query (default: %(default)s)")

    rep = sub.add_parser("report", help="write one self-contained HTML page to browse an attribution: each query "
                                        "with its most helpful and most harmful training examples (content, "
                                        "labels, scores), the most suspicious training examples, histograms, "
                                        "settings and warnings",
                         description="Write an HTML attribution report (open it in any browser; no network). " + SIGN)
    _add_entry(rep)
    _add_estimator(rep)
    rep.add_argument("--out", default="report.html", help="the HTML file to write (default: %(default)s)")
    from .report.options import ReportOptions
    add_options(rep.add_argument_group("report (from ReportOptions)"), {"report": ReportOptions})
    rep.add_argument("--no-progress", action="store_true", help="hide progress bars")

    info = sub.add_parser("info", help="what a store holds; verifies every shard's size and checksum and "
                                       "reports a truncated or corrupted store as damaged")
    info.add_argument("store", help="store folder")
    info.add_argument("--no-verify", action="store_true", help="skip the checksums and the diagnostics (sizes "
                                                               "only; faster)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import DropinfError
    try:
        return _run(args)
    except DropinfError as exc:
        print(f"dropinf {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:             # `dropinf info ... | head`: the reader went away
        import os
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        import errno
        if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) or isinstance(exc, BrokenPipeError):
            raise
        print(f"dropinf {args.cmd}: error: no space left on the device writing {exc.filename or 'the output'} "
              f"(reports, scores or store files). Free some space and re-run the same command: finished "
              f"store chunks are kept and resumed.", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.cmd in ("demo", "reproduce"):
        _experiments()
    if args.cmd == "demo":
        if args.digits:
            from dropinf_experiments.demo import run_demo
            run_demo(out=args.out if args.out != "reports/mislabel" else "reports/digits", progress=not args.no_progress)
            return 0
        from dropinf_experiments import mislabel
        s = mislabel.PRESETS["fast"]
        print(f"dropinf demo: mislabeled-data detection, MiniLM-L6 + LoRA on {s.n_train} tweets with "
              f"{s.flip:.0%} flipped labels (= dropinf reproduce mislabel). It fine-tunes the model "
              f"{len(s.ranks) * s.runs} times (LoRA ranks {', '.join(map(str, s.ranks))} × {s.runs} runs) and scores "
              f"every training tweet with 6 methods after each; the first AUCs print after about a minute and "
              f"the whole table after about 7 minutes on 2 CPU cores.", flush=True)
        mislabel.run("fast", out=args.out, progress=not args.no_progress)
        return 0
    if args.cmd == "reproduce":
        import importlib
        mod = importlib.import_module(f"dropinf_experiments.{args.name.replace('-', '_')}")
        preset = "smoke" if args.smoke else "full" if args.full else "fast"
        mod.run(preset, out=args.out or f"reports/{args.name}", progress=not args.no_progress)
        return 0
    if args.cmd == "info":
        from .store.disk import FeatureStore
        st = FeatureStore.open(args.store, require_complete=False)
        report = st.info(verify=not args.no_verify)
        from .report.diagnose import SIGN as LONG_SIGN, store_findings
        report["sign"] = LONG_SIGN
        if report["complete"] and not args.no_verify:
            report["findings"] = [f.text() for f in store_findings(st)] or ["no problems detected"]
        print(json.dumps(report, indent=1, default=str))
        return 1 if report["damaged"] else 0
    from .attribute import Attributor
    task = _task(args)
    if args.cmd == "featurize":
        track = args.track
        if track and track not in ("all", "lora"):
            track = [_track_item(t.strip()) for t in track.split(",") if t.strip()]
        attr = Attributor(task.model, task.loss_fn, compressor=_compressor(args), track=track,
                          progress=not args.no_progress)
        from .options import build
        from .store.writer import StoreOptions
        store = attr.featurize(task.loader("train"), store=build(StoreOptions, args, path=args.store))
        from .dist import dist_info
        if dist_info().rank == 0:
            print(json.dumps(store.info(), indent=1))
        return 0
    # the train loader: for estimators that refit from the model (exact, lissa --lissa-hvp model) and for
    # the report's training-example content; the others never iterate it
    attr = Attributor.from_store(args.store, task.model, task.loss_fn, estimator=_estimator(args),
                                 progress=not args.no_progress, score_options=_score_options(args),
                                 train_loader=task.loader("train"))
    q = task.loader("query")
    measure = _measure(args, task)
    if args.cmd == "report":
        from .options import build
        from .report.options import ReportOptions
        opts = ReportOptions.of(build(ReportOptions, args, measure=measure), **task.report_options())
        path = attr.report(q, args.out, opts)
        print(f"wrote {path}: open it in a browser. {SIGN}")
        return 0
    if args.cmd == "score":
        out = attr.score(q, reduce=args.reduce, out=args.out, measure=measure)    # torchrun-aware memmap
        from .dist import dist_info
        if dist_info().rank == 0:
            print(f"wrote {args.out}: float32 {tuple(out.shape)}. {SIGN}")
        return 0
    top = attr.topk(q, k=args.k, reduce=args.reduce, measure=measure)
    from .dist import dist_info
    if dist_info().rank != 0:
        return 0
    text = json.dumps(top.as_dict())
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}: helpful_idx/helpful_scores (most negative I first) and "
              f"harmful_idx/harmful_scores (most positive first), each ({len(top.helpful_idx)}, {args.k})")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
