"""The paper's largest scale on one machine: a random-init model shaped like Pythia-1.4B
(GPT-NeoX: 24 layers, d=2048, 16 heads, MLP 8192, vocab 50,304; 1.41 B parameters), batches of
2 × 128 random tokens, every nn.Linear inside the decoder layers tracked (96 blocks,
``track=[(nn.Linear, "gpt_neox.layers.*")]``: full fine-tuning, as in the paper). Each variant in
its own process:

  plain     loss.sum().backward() per batch (a training step without the optimizer)
  dropout   Dropout r=512 per block, featurize into a store
  logra     LoGra 64 × 64 per block, featurize into a store
  gaussian  Gaussian r=512 per block: the per-batch cost only, without the self-check and the store
            (only with --gaussian: it regenerates r·d normals per block and batch, the paper's point);
            gaussian-hash the same with Gaussian(generator="hash"): the normals made on the device

and, for the store variants, a second process that reopens the store with the model, fits
GaussNewton and takes the top-10 of 2 queries: fit seconds and the memory the fit adds.

Printed per variant: seconds per batch (the batches after the first; the first is self-checked),
ratio to plain, peak RSS (CUDA: max allocated), peak over the footprint with the model loaded,
store bytes per example; fit seconds and memory. Goal on CPU (issue 23): Dropout ≤ 0.6× plain
time and ≤ 0.6× plain peak memory.

Run: python benchmarks/billion.py [--batches 4] [--layers 24] [--threads 2] [--device cpu|cuda]
     [--gaussian]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import rss_mb  # noqa: E402

VARIANTS = {"dropout": "Dropout r=512", "logra": "LoGra 64x64", "gaussian": "Gaussian r=512",
            "gaussian-hash": "Gaussian r=512, generator=hash"}


def build(layers: int, batches: int, device: str):
    import torch
    import transformers
    from torch import nn

    cfg = transformers.GPTNeoXConfig(vocab_size=50304, hidden_size=2048, num_hidden_layers=layers,
                                     num_attention_heads=16, intermediate_size=8192, max_position_embeddings=2048,
                                     rotary_pct=0.25, use_parallel_residual=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):          # initialised where it runs (a 1.4 B init on the host is slow)
        model = transformers.GPTNeoXForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50304, (2 * (batches + 1), 128), generator=g)
    ds = torch.utils.data.TensorDataset(ids)

    def lm_loss(model, batch):
        (x,) = batch
        logits = model(input_ids=x).logits[:, :-1]
        tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                          reduction="none")
        return tok.reshape(x.shape[0], -1).sum(1)

    track = [(nn.Linear, "gpt_neox.layers.*")]
    return model, lm_loss, ds, track


def _compressor(variant: str):
    from dropinf import Dropout, Gaussian, LoGra
    return {"dropout": Dropout(r=512, seed=0), "logra": LoGra(64, 64, seed=0),
            "gaussian": Gaussian(r=512, seed=0), "gaussian-hash": Gaussian(r=512, seed=0, generator="hash")}[variant]


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> float:
    import torch
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else rss_mb()


def child(variant: str, a) -> dict:
    import torch
    from dropinf import Attributor, CaptureOptions, GaussNewton, StoreOptions
    from dropinf.store.writer import featurize_to_store

    model, loss_fn, ds, track = build(a.layers, a.batches, a.device)
    n_params = sum(p.numel() for p in model.parameters())
    to = lambda b: [t.to(a.device) for t in b]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(2 * a.batches)), batch_size=2)
    queries = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(2 * a.batches, 2 * a.batches + 2)),
                                          batch_size=2)
    base = _peak(a.device) if a.device.startswith("cuda") else rss_mb()
    out = {"params": n_params}
    if variant == "plain":
        times = []
        for b in loader:
            t0 = time.perf_counter()
            loss_fn(model, to(b)).sum().backward()
            model.zero_grad(set_to_none=True)
            _sync(a.device)
            times.append(time.perf_counter() - t0)
        out.update(per_batch_s=sum(times[1:]) / max(len(times) - 1, 1), first_s=times[0])
    elif variant.endswith("-fit"):
        t0 = time.perf_counter()
        attr = Attributor.from_store(a.store, model, loss_fn, estimator=GaussNewton(), progress=False,
                                     options=CaptureOptions(device=a.device))
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        top = attr.topk(queries, k=10)
        out.update(fit_s=fit_s, topk_s=time.perf_counter() - t0, top_shape=list(top.helpful_idx.shape))
    else:
        # Gaussian: per-batch cost only (its self-check would regenerate P four more times; no store)
        check = "never" if variant.startswith("gaussian") else "first"
        attr = Attributor(model, loss_fn, compressor=_compressor(variant), estimator=GaussNewton(), track=track,
                          progress=False, options=CaptureOptions(device=a.device, check=check))
        times = []
        f = attr.featurizer
        capture = f.capture()
        with warnings.catch_warnings(), f.mode():
            warnings.simplefilter("ignore")
            for b in loader:           # the same per-batch work featurize does, timed batch by batch
                t0 = time.perf_counter()
                feats, _ = capture(to(b))
                _sync(a.device)
                times.append(time.perf_counter() - t0)
        del feats
        out.update(per_batch_s=sum(times[1:]) / max(len(times) - 1, 1), first_s=times[0],
                   blocks=len(attr.layers), r_total=sum(c.r for c in attr.compressors.values()))
        t0 = time.perf_counter()
        if variant.startswith("gaussian"):
            peak = _peak(a.device)
            out.update(peak_mb=peak, extra_mb=peak - base)
            return out
        with warnings.catch_warnings():          # the same batches again, through the store writer
            warnings.simplefilter("ignore")
            store = featurize_to_store(f, loader, StoreOptions(a.store))
        out.update(store_s=time.perf_counter() - t0,
                   store_bytes_per_example=sum(p.stat().st_size for p in Path(a.store).rglob("*") if p.is_file())
                   / store.n)
    peak = _peak(a.device)
    out.update(peak_mb=peak, extra_mb=peak - base)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=4, help="batches of 2 x 128 tokens per variant (default 4)")
    p.add_argument("--layers", type=int, default=24, help="decoder layers (24: Pythia-1.4B; fewer for a quick run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gaussian", action="store_true", help="also Gaussian r=512 (slow by nature), with the CPU "
                                                            "generator and with generator=hash (made on the device)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(child(a.child, a)))
        return
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="dropinf-billion-"))
    rows = {}
    variants = ["plain", "dropout", "dropout-fit", "logra", "logra-fit"] + (["gaussian", "gaussian-hash"] if a.gaussian else [])
    try:
        for v in variants:
            store = tmp / v.removesuffix("-fit")
            args = [sys.executable, __file__, "--child", v, "--store", str(store), "--batches", str(a.batches),
                    "--layers", str(a.layers), "--threads", str(a.threads), "--device", a.device]
            t0 = time.perf_counter()
            proc = subprocess.run(args, capture_output=True, text=True, env=env)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            r = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
                {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
            r["proc_s"] = time.perf_counter() - t0
            rows[v] = r
            print(f"  {v}: {json.dumps(r)}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pl = rows.get("plain", {})
    mem = "GPU max allocated" if a.device.startswith("cuda") else "RSS"
    print(f"\nPythia-1.4B shape, {a.layers} layers ({pl.get('params', 0) / 1e9:.2f} B parameters), {a.batches} batches "
          f"of 2 x 128 tokens, device {a.device}, {a.threads} threads; peak = {mem}; '+MB' over the footprint with "
          f"the model loaded\n")
    print("| variant | s / batch | tokens/s | time / plain | peak MB (+MB) | peak / plain | store B / example | "
          "fit + load s | top-k s | fit peak MB (+MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v in ["plain"] + [v for v in VARIANTS if v in rows]:
        r, fit = rows[v], rows.get(f"{v}-fit", {})
        if "error" in r:
            print(f"| {VARIANTS.get(v, v)} | {r['error']} | | | | | | | | |")
            continue
        ratio = lambda k: f"{r[k] / pl[k]:.2f}x" if pl and "error" not in pl else "-"
        store = f"{r['store_bytes_per_example']:,.0f}" if "store_bytes_per_example" in r else "-"
        fit_s = (f"{fit['fit_s']:.1f}" if "fit_s" in fit else fit.get("error", "-"))
        print(f"| {VARIANTS.get(v, 'plain forward+backward')} | {r['per_batch_s']:.2f} | {256 / r['per_batch_s']:,.0f} | "
              f"{ratio('per_batch_s')} | "
              f"{r['peak_mb']:.0f} (+{r['extra_mb']:.0f}) | {ratio('peak_mb')} | {store} | {fit_s} | "
              f"{fit.get('topk_s', float('nan')):.1f} | "
              + (f"{fit['peak_mb']:.0f} (+{fit['extra_mb']:.0f})" if "peak_mb" in fit else "-") + " |")


if __name__ == "__main__":
    main()
