"""LLM capture benchmark (issue 4): SmolLM2-135M, every Linear tracked (the LM head's weight is
tied to the token embedding, so that block covers both uses), r=64 per layer, batches of
8 × 128 tokens of real Wikipedia text.

  (a) fused capture: r entries per layer from activations × output-gradients
  (b) torch.func per-example gradients of the same parameters (vmap; a per-example loop if vmap
      cannot trace the model), then the same index gather

Each variant runs in its own process; the table gives seconds per batch and peak RSS.
Run: python benchmarks/llm_capture.py [--batches 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import rss_mb, run_variants  # noqa: E402

LABELS = {"a": "fused capture (dropinf)", "b": "torch.func per-example grads + gather"}


def child(v: str, batches: int, bs: int, tokens: int, r: int) -> None:
    import torch
    from dropinf import CaptureOptions, Dropout, Featurizer
    from dropinf_experiments.data.text import TokenDataset, lm_loss
    from dropinf_experiments.data.wiki import load_wiki_paragraphs
    from dropinf_experiments.models.hf import load_smollm2

    torch.manual_seed(0)
    model, tok = load_smollm2()
    paras = [p for p in load_wiki_paragraphs() if len(p.split()) > 150][: batches * bs]
    ds = TokenDataset(tok, paras, max_length=tokens)
    base = rss_mb()
    attr = Featurizer(model, lm_loss, compressor=Dropout(r=r, seed=0), progress=False,
                      options=CaptureOptions(fused=(v == "a")))
    n_layers, d = len(attr.layers), sum(l.dim for l in attr.layers)
    path = "fused"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        feats = attr.features(ds.loader(bs))
        secs = time.perf_counter() - t0
    if v == "b":
        path = "loop (vmap failed)" if any("vmap failed" in str(w.message) for w in caught) else "vmap"
    assert feats.n == batches * bs and all(torch.isfinite(f).all() for f in feats.data.values())
    print(json.dumps({"seconds": secs, "featurize_s": secs, "per_batch_s": secs / batches, "peak_rss_mb": rss_mb(),
                      "extra_rss_mb": rss_mb() - base, "blocks": n_layers, "tracked_params": d, "path": path}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--only", default="")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    extra = ["--batches", str(a.batches), "--batch-size", str(a.batch_size), "--tokens", str(a.tokens), "--r", str(a.r)]
    if a.child:
        child(a.child, a.batches, a.batch_size, a.tokens, a.r)
        return
    print(f"SmolLM2-135M, every Linear tracked, r={a.r} per layer, {a.batches} batches of {a.batch_size} x "
          f"{a.tokens} tokens (real Wikipedia paragraphs)")
    rows = run_variants(__file__, a.only.split(",") if a.only else list(LABELS), extra, timeout=3000)
    print("\n| variant | s / batch | peak RSS MB | RSS over model MB | blocks | tracked params | path |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| ({r['variant']}) {LABELS[r['variant']]} | {r['error']} | | | | | |")
            continue
        print(f"| ({r['variant']}) {LABELS[r['variant']]} | {r['per_batch_s']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['extra_rss_mb']:.0f} | {r['blocks']} | {r['tracked_params']:,} | {r['path']} |")


if __name__ == "__main__":
    main()
