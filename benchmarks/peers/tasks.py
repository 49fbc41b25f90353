"""The three tasks of the peer comparison: data, the attributed model (trained once, saved in the
prep folder so that every variant attributes the same checkpoint), the loss, and how quality is
measured. Runs in the peers' virtual environment (benchmarks/peers/setup.sh).

  mlp     784-512-256-10 MLP on Fashion-MNIST (the LDS harness's task (a), dropinf_experiments.lds_tasks),
          n_train from the preset (20,000 by default); quality = LDS against retrained half-subsets
  tweets  MiniLM-L6 + peft LoRA (rank 8, query/value) fine-tuned on tweets with 20 % of the training
          labels flipped; quality = mislabel AUC of the influence on the mean validation loss
  smollm  SmolLM2-135M, every nn.Linear inside the decoder layers (210 of them; the LM head, tied to
          the embedding, is left out for every library alike); quality = none, throughput (tokens/s)

Every training loss here is per example; a library that wants a batch loss gets the sum.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


@dataclass(frozen=True)
class Sizes:
    mlp_train: int = 20000
    mlp_query: int = 200
    gt_subsets: int = 64
    gt_seeds: tuple = (0, 1)
    tweets_train: int = 4000
    tweets_val: int = 200
    tweets_len: int = 32
    tweets_epochs: int = 2
    smollm_seqs: int = 16
    smollm_tokens: int = 128


PRESETS = {
    "smoke": Sizes(mlp_train=600, mlp_query=20, gt_subsets=8, gt_seeds=(0,), tweets_train=64, tweets_val=16,
                   tweets_epochs=1, smollm_seqs=2, smollm_tokens=32),
    "fast": Sizes(),
    "full": Sizes(tweets_train=8000, tweets_val=400, gt_subsets=128, gt_seeds=(0, 1, 2), smollm_seqs=64),
}


# ------------------------------------------------------------------ mlp (LDS)

def mlp_size(s: Sizes):
    from dropinf_experiments import lds_tasks as T
    return T.TaskSize(s.mlp_train, s.mlp_query, 4, 128, 1e-3)


def prepare_mlp(s: Sizes, folder: Path, workers: int = 2) -> None:
    from dropinf.eval.lds import build_ground_truth, random_subsets
    from dropinf_experiments import lds_tasks as T
    size = mlp_size(s)
    if not (folder / "model.pt").exists():
        torch.save(T.train("mlp", size, None, seed=0).state_dict(), folder / "model.pt")
    masks = random_subsets(size.n_train, s.gt_subsets, 0.5, seed=1234)
    build_ground_truth(functools.partial(T.trainer, "mlp", size), functools.partial(T.measurer, "mlp", size),
                       masks, folder / "ground-truth", seeds=s.gt_seeds, workers=workers, progress=True)


def load_mlp(s: Sizes, folder: Path):
    """(model, train TensorDataset, query TensorDataset)."""
    from dropinf_experiments import lds_tasks as T
    size = mlp_size(s)
    model = T.mlp_model(0)
    model.load_state_dict(torch.load(folder / "model.pt"))
    model.eval()
    tr, q = T.data("mlp", size)
    return model, TensorDataset(*tr), TensorDataset(*q)


def mlp_quality(scores: np.ndarray, s: Sizes, folder: Path) -> float:
    from dropinf.eval.lds import load_ground_truth, lds
    return lds(scores, load_ground_truth(folder / "ground-truth")).mean


# ------------------------------------------------------------------ tweets (mislabel AUC)

def _tweet_settings(s: Sizes):
    from dropinf_experiments.mislabel import MislabelSettings
    return MislabelSettings(n_train=s.tweets_train, n_val=s.tweets_val, max_length=s.tweets_len,
                            epochs=s.tweets_epochs, lr=2e-3, batch_size=16, ranks=(8,), r=16)


class TweetDataset(Dataset):
    """Fixed-length padded tokens, so every library's default collate works: items are
    (input_ids, attention_mask, label) tensors."""

    def __init__(self, ids, mask, labels):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.ids[i], self.mask[i], self.labels[i]


def _encode(tok, texts, labels, max_len):
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return TweetDataset(enc["input_ids"], enc["attention_mask"], torch.as_tensor(np.asarray(labels), dtype=torch.long))


def prepare_tweets(s: Sizes, folder: Path) -> None:
    from dropinf_experiments.data.text import TokenDataset
    from dropinf_experiments.mislabel import fine_tune, noisy_tweets
    from dropinf_experiments.models.hf import load_minilm_classifier
    if (folder / "lora.pt").exists():
        return
    st = _tweet_settings(s)
    tr_x, tr_y, flipped, va_x, va_y = noisy_tweets(st, seed=0)
    model, tok = load_minilm_classifier(lora_rank=8, seed=0)
    fine_tune(model, TokenDataset(tok, tr_x, tr_y, st.max_length), st.epochs, st.lr, st.batch_size, 0, True)
    trainable = {k: v for k, v in model.state_dict().items() if "lora_" in k or "classifier" in k or "score" in k}
    np.save(folder / "flipped.npy", flipped)
    (folder / "data.json").write_text(json.dumps({"train": [list(tr_x), np.asarray(tr_y).tolist()],
                                                  "val": [list(va_x), np.asarray(va_y).tolist()]}))
    torch.save(trainable, folder / "lora.pt")


def load_tweets_task(s: Sizes, folder: Path):
    """(model, train TweetDataset, val TweetDataset, lora module names)."""
    from dropinf_experiments.common import quiet_hf
    from dropinf_experiments.models.hf import load_minilm_classifier
    quiet_hf()
    model, tok = load_minilm_classifier(lora_rank=8, seed=0)
    missing = model.load_state_dict(torch.load(folder / "lora.pt"), strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    model.eval()
    d = json.loads((folder / "data.json").read_text())
    tr = _encode(tok, *d["train"], s.tweets_len)
    va = _encode(tok, *d["val"], s.tweets_len)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ("lora_A" in n or "lora_B" in n)]
    return model, tr, va, names


def tweet_loss(model, batch):
    """(B,) cross-entropy of a (input_ids, attention_mask, labels) batch."""
    ids, mask, y = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def tweets_quality(scores: np.ndarray, s: Sizes, folder: Path) -> float:
    """AUC of the influence on the mean validation loss (positive = harmful) against the flips."""
    from sklearn.metrics import roc_auc_score
    flipped = np.load(folder / "flipped.npy")
    return float(roc_auc_score(flipped, np.asarray(scores).mean(0)))


# ------------------------------------------------------------------ smollm (throughput)

def prepare_smollm(s: Sizes, folder: Path) -> None:
    from dropinf_experiments.models.hf import load_smollm2
    load_smollm2()            # dequantise the GGUF once into the cache


def load_smollm(s: Sizes, folder: Path):
    """(model, TensorDataset of (input_ids, attention_mask) with exactly s.smollm_tokens real tokens
    each, Linear module names inside the decoder layers)."""
    from dropinf_experiments.data.wiki import load_wiki_paragraphs
    from dropinf_experiments.models.hf import load_smollm2
    model, tok = load_smollm2()
    model.eval()
    paras = [p for p in load_wiki_paragraphs() if len(p.split()) > 150][: s.smollm_seqs]
    enc = tok(paras, truncation=True, max_length=s.smollm_tokens, padding="max_length", return_tensors="pt")
    assert int(enc["attention_mask"].sum()) == s.smollm_seqs * s.smollm_tokens
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return model, TensorDataset(enc["input_ids"], enc["attention_mask"]), names


def lm_loss(model, batch):
    """(B,) summed next-token loss of a (input_ids, attention_mask) batch."""
    ids, mask = batch[0], batch[1]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none",
                                            ignore_index=-100)
    return tok.view(tgt.shape).sum(1)


PREPARE = {"mlp": prepare_mlp, "tweets": prepare_tweets, "smollm": prepare_smollm}
QUALITY = {"mlp": ("LDS", mlp_quality), "tweets": ("mislabel AUC", tweets_quality)}


def settings_json(s: Sizes) -> str:
    return json.dumps(asdict(s))
