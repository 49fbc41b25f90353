"""Capture overhead (issue 10): fused capture — Dropout entries computed inside the backward
pass — against one plain batched forward + backward of the same batches, per model, each variant
in its own process (its own peak memory).

  plain   loss.sum().backward() on every batch (what training does; grads of every trainable
          parameter), nothing else
  fused   dropinf's capture as featurize into a store runs it per batch (store.writer,
          Featurizer.rows): the same forward + a backward with the compressing hooks, which write
          every tracked layer's (B, r) rows into the writer's reused (batch, width) buffer
          (BatchRows), and the NaN/inf check of the rows; the rows are then handed on as they
          would be to the file. Both sides run one warm-up batch first, outside
          the per-batch time; on the fused side that is where the self-check runs (the rows of three
          examples against their own gradients, capture.check), timed on its own: "checked 1st
          batch" is its time over one regular fused batch (the first batch also pays one-off
          warm-up costs: index maps, allocator). The peak includes it.

Before either side's baseline, each process runs both code paths on two examples (a plain
forward+backward, and a separate capture session's checked and capture-only batches, released):
a pass's first call of each kernel maps that part of torch's library code into the process's
RSS (megabytes, shared with every other torch process, dropped under memory pressure), and the
capture calls kernels the plain pass does not. The kernel's peak-RSS counter is then reset
(/proc/self/clear_refs), so the peaks are the memory each pass adds, with the same code resident
on both sides.

Models (real weights and text where the project ships them):
  mlp       MLP 784-512-256-10, batches of 256, every Linear, r=1024
  resnet18  torchvision resnet18's layout (dropinf_experiments.models.vision, width 64),
            3×64×64 images, batches of 32, every Conv2d + Linear, r=1024
  minilm    all-MiniLM-L6-v2 + LoRA (rank 8, q/v) classifier on tweets, batches of 32 × 40 tokens,
            default track (LoRA A/B + head), r=64
  smollm2   SmolLM2-135M, every Linear, batches of 4 × 128 tokens of Wikipedia, r=64

The table gives seconds per batch, peak RSS, and peak RSS over the process's footprint before
the first batch (model and data loaded) — the memory the pass itself adds — with fused / plain
ratios. On CUDA (--device cuda) peak memory is torch.cuda.max_memory_allocated.

On the CPU, glibc keeps freed memory mapped (its heap and per-thread arenas, with a mmap threshold
that rises as large blocks are freed), so the peak RSS of the same work moves by ±10 % from run
to run with the order of allocations (SmolLM2's fused pass measured 2229–2434 MB in three runs of
identical work). A second pair of children per model therefore runs with
MALLOC_MMAP_THRESHOLD_=65536 — every block of 64 KiB or more mapped on allocation and returned on
release — where the peak RSS is the memory the pass actually holds at once ("live peak"); their
seconds are not used.
Run: python benchmarks/capture_overhead.py [--models mlp,resnet18,minilm,smollm2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import rss_mb  # noqa: E402

SETTINGS = {"mlp": dict(batches=40, r=1024), "resnet18": dict(batches=12, r=1024),
            "minilm": dict(batches=8, r=64), "smollm2": dict(batches=3, r=64)}


def build(name: str):
    """(model, loss_fn, loader, track)."""
    import torch
    from torch import nn

    def ce(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    g = torch.Generator().manual_seed(0)
    b = SETTINGS[name]["batches"]
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
        ds = torch.utils.data.TensorDataset(torch.randn(256 * b, 784, generator=g), torch.randint(0, 10, (256 * b,), generator=g))
        return model, ce, torch.utils.data.DataLoader(ds, batch_size=256), None
    if name == "resnet18":
        from dropinf_experiments.models.vision import ResNet18
        model = ResNet18(width=64, classes=10)
        ds = torch.utils.data.TensorDataset(torch.randn(32 * b, 3, 64, 64, generator=g),
                                            torch.randint(0, 10, (32 * b,), generator=g))
        return model, ce, torch.utils.data.DataLoader(ds, batch_size=32), [nn.Conv2d, nn.Linear]
    if name == "minilm":
        from dropinf_experiments.data.text import TokenDataset, classifier_loss
        from dropinf_experiments.data.tweets import load_tweets
        from dropinf_experiments.models.hf import load_minilm_classifier
        data = load_tweets()
        model, tok = load_minilm_classifier(lora_rank=8)
        ds = TokenDataset(tok, data.texts[:32 * b], data.labels[:32 * b], max_length=40)
        return model, classifier_loss, ds.loader(32), None
    from dropinf_experiments.data.text import TokenDataset, lm_loss
    from dropinf_experiments.data.wiki import load_wiki_paragraphs
    from dropinf_experiments.models.hf import load_smollm2
    model, tok = load_smollm2()
    paras = [p for p in load_wiki_paragraphs() if len(p.split()) > 150][: 4 * b]
    ds = TokenDataset(tok, paras, max_length=128)
    return model, lm_loss, ds.loader(4), None


def peak_mb() -> float:
    """The process's peak RSS since start or since reset_peak() (VmHWM; ru_maxrss elsewhere)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return rss_mb()


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux: /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(name: str, variant: str, device: str) -> dict:
    import torch
    from dropinf import CaptureOptions, Dropout, Featurizer
    from dropinf.store.writer import BatchRows, store_layers

    torch.manual_seed(0)
    model, loss_fn, loader, track = build(name)
    model = model.to(device).eval()
    batches = [b for b in loader]
    cuda = device.startswith("cuda")
    to = lambda b: {k: v.to(device) for k, v in b.items()} if isinstance(b, dict) else [t.to(device) for t in b]
    out = {}
    featurizer = lambda: Featurizer(model, loss_fn, compressor=Dropout(r=SETTINGS[name]["r"], seed=0), track=track,
                                    progress=False, options=CaptureOptions(device=device))
    # both sides first run both code paths on two examples (a plain pass; a capture session's checked
    # and capture-only batches, released), so each process has the same library code resident; the
    # peak is then reset and measured over the passes alone (module docstring)
    few = {k: v[:2] for k, v in batches[0].items()} if isinstance(batches[0], dict) else [t[:2] for t in batches[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm = featurizer().capture()
        warm(to(few))
        warm(to(few))
    del warm
    loss_fn(model, to(few)).sum().backward()
    model.zero_grad(set_to_none=True)
    if variant != "plain":        # built before the baseline, as the model and the data are
        attr = featurizer()
        capture = attr.capture()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out["peak_reset"] = reset_peak()
    base_rss, base_gpu = peak_mb(), (torch.cuda.memory_allocated() / 2**20 if cuda else 0.0)
    if variant == "plain":
        loss_fn(model, to(batches[0])).sum().backward()       # warm-up, as the fused side's first batch
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for b in batches:
            loss_fn(model, to(b)).sum().backward()
            model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    else:
        out["func_blocks"] = sorted({type(dict(model.named_modules())[l.name]).__name__
                                     for l in attr.layers if l.kind == "func"})
        out["blocks"] = len(attr.layers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the store's per-batch path (store.writer): rows written by the hooks into one reused
            # (batch, width) buffer, laid out as the store's rows, then handed to the writer
            stage = BatchRows(store_layers(attr), loader.batch_size, torch.device(device))
            t0 = time.perf_counter()
            attr.rows(capture, batches[0], None, out=stage.views)     # warm-up and the first-batch self-check
            if cuda:
                torch.cuda.synchronize()
            out["first_batch_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for b in batches:
                # Featurizer.rows: featurize's own per-batch call (to the device, capture, NaN/inf check)
                _, feats, _, _, _ = attr.rows(capture, b, None, out=stage.views)
                block = stage.block(feats)          # (B, width) on the CPU, as the store's writer gets it
            if cuda:
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
        assert bool(torch.isfinite(block).all())
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_mb()
    out.update(seconds=secs, per_batch_s=secs / len(batches), peak_mb=peak,
               extra_mb=peak - (base_gpu if cuda else base_rss), batches=len(batches))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,resnet18,minilm,smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the fastest is kept")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(child(a.child, a.variant, a.device)))
        return
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    live_env = {**env, "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = {}
    for rep in range(a.repeats + (0 if a.device.startswith("cuda") else 1)):    # the last: live peaks (CPU)
        live = rep == a.repeats
        for name in a.models.split(","):
            for variant in ("plain", "fused"):
                proc = subprocess.run([sys.executable, __file__, "--child", name, "--variant", variant, "--device",
                                       a.device, "--threads", str(a.threads)], capture_output=True, text=True,
                                      env=live_env if live else env)
                lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
                if proc.returncode != 0 or not lines:
                    r = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]}
                else:
                    r = json.loads(lines[-1])
                if live:
                    if "error" not in r:
                        results.setdefault((name, variant), {})["live_mb"] = r["peak_mb"]
                    print(f"  {name} {variant}: live peak " + (r["error"] if "error" in r else f"{r['peak_mb']:.0f} MB"),
                          flush=True)
                    continue
                old = results.get((name, variant))
                if old is None or ("error" not in r and ("error" in old or r["seconds"] < old["seconds"])):
                    results[(name, variant)] = r
                print(f"  {name} {variant}: " + (r["error"] if "error" in r else
                                                 f"{r['per_batch_s']:.3f} s/batch, peak {r['peak_mb']:.0f} MB, "
                                                 f"+{r['extra_mb']:.0f} MB"), flush=True)
    mem = "GPU max allocated" if a.device.startswith("cuda") else "RSS"
    print(f"\ndevice {a.device}, {a.threads} threads; peak = {mem}; '+MB' = peak over the footprint before the "
          f"first batch (model and data loaded)")
    print("\n| model | plain s/batch | fused s/batch | time fused/plain | plain peak MB (+MB) | fused peak MB (+MB) "
          "| peak fused/plain | +MB fused/plain | live peak MB plain / fused | live peak fused/plain "
          "| checked 1st batch | blocks | via torch.func |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.models.split(","):
        pl, fu = results.get((name, "plain"), {}), results.get((name, "fused"), {})
        if "error" in pl or "error" in fu or not pl or not fu:
            print(f"| {name} | {pl.get('error', '')} | {fu.get('error', '')} | | | | | | | | | | |")
            continue
        live = (f"{pl['live_mb']:.0f} / {fu['live_mb']:.0f} | {fu['live_mb'] / pl['live_mb']:.2f}x"
                if "live_mb" in pl and "live_mb" in fu else "- | -")
        print(f"| {name} | {pl['per_batch_s']:.3f} | {fu['per_batch_s']:.3f} | {fu['seconds'] / pl['seconds']:.2f}x | "
              f"{pl['peak_mb']:.0f} (+{pl['extra_mb']:.0f}) | {fu['peak_mb']:.0f} (+{fu['extra_mb']:.0f}) | "
              f"{fu['peak_mb'] / pl['peak_mb']:.2f}x | {fu['extra_mb'] / max(pl['extra_mb'], 1):.2f}x | {live} | "
              f"{fu['first_batch_s']:.3f} s ({fu['first_batch_s'] / fu['per_batch_s']:.1f}x) | "
              f"{fu['blocks']} | {', '.join(fu['func_blocks']) or 'none'} |")


if __name__ == "__main__":
    main()
