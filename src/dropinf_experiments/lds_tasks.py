"""The three LDS tasks of ``dropinf reproduce lds``: data, model, a seeded from-scratch trainer and
the per-query measurement (summed loss), all module-level so retraining runs in worker processes.

(a) ``mlp``:  784-512-256-10 MLP on Fashion-MNIST (minibatch Adam).
(b) ``cnn``:  ResNet-9-style CNN (models.resnet) on Fashion-MNIST (SGD, momentum, linear decay).
(c) ``lm``:   a byte-level causal transformer LM (2 blocks, every projection an nn.Linear) trained
              from scratch on Wikipedia paragraphs (gensim wheel); per-example loss = the summed
              next-byte loss of the paragraph — the sequence-model case where GraSS measured a
              plain coordinate mask far behind dense sketches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TaskSize:
    n_train: int
    n_query: int
    epochs: int
    batch_size: int
    lr: float
    width: int = 0          # CNN width / LM model dim
    seq_len: int = 0        # LM bytes per paragraph


# ------------------------------------------------------------------ data (cached per process)

@lru_cache(maxsize=4)
def fashion(n_train: int, n_query: int):
    from .data.fashion import load_fashion_mnist
    x, y = load_fashion_mnist("train")
    xq, yq = load_fashion_mnist("test")
    return x[:n_train].contiguous(), y[:n_train].contiguous(), xq[:n_query].contiguous(), yq[:n_query].contiguous()


@lru_cache(maxsize=4)
def wiki_bytes(n_train: int, n_query: int, seq_len: int):
    """(train (n, L) int64, query (q, L) int64): the first seq_len UTF-8 bytes of paragraphs; the
    queries are paragraphs after the training ones (other articles' text mostly)."""
    from .data.wiki import load_wiki_paragraphs
    paras = load_wiki_paragraphs()
    if len(paras) < n_train + n_query:
        raise ValueError(f"only {len(paras)} Wikipedia paragraphs, need {n_train + n_query}")

    def enc(p):
        b = list(p.encode("utf-8")[:seq_len])
        return b + [0] * (seq_len - len(b))
    train = torch.tensor([enc(p) for p in paras[:n_train]], dtype=torch.long)
    query = torch.tensor([enc(p) for p in paras[len(paras) - n_query:]], dtype=torch.long)
    return train, query


# ------------------------------------------------------------------ models

def mlp_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def cnn_model(seed: int, width: int) -> nn.Module:
    from .models.resnet import resnet9
    return resnet9(width=width, seed=seed)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        h = self.ln1(x)
        split = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    """Causal transformer over bytes: embedding + positions, pre-LN blocks, untied Linear head."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, max_len: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 256)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def lm_model(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return ByteLM(d=width, max_len=512)


# ------------------------------------------------------------------ losses (per example, (B,))

def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def lm_loss(model, batch):
    """Summed next-byte loss per paragraph (padding bytes 0 after the text are ignored)."""
    ids = batch[0] if isinstance(batch, (list, tuple)) else batch
    logits = model(ids[:, :-1])
    target = ids[:, 1:].masked_fill(ids[:, 1:] == 0, -100)
    tok = F.cross_entropy(logits.reshape(-1, 256), target.reshape(-1), reduction="none", ignore_index=-100)
    return tok.view(target.shape).sum(1)


# ------------------------------------------------------------------ one task = data + train + measure

TASKS = ("mlp", "cnn", "lm")


def data(task: str, s: TaskSize):
    """(train tensors tuple, query tensors tuple) for the task."""
    if task == "lm":
        tr, q = wiki_bytes(s.n_train, s.n_query, s.seq_len)
        return (tr,), (q,)
    x, y, xq, yq = fashion(s.n_train, s.n_query)
    return (x, y), (xq, yq)


def build(task: str, s: TaskSize, seed: int) -> nn.Module:
    if task == "mlp":
        return mlp_model(seed)
    if task == "cnn":
        return cnn_model(seed, s.width)
    return lm_model(seed, s.width)


def loss_fn(task: str):
    return lm_loss if task == "lm" else ce_loss


def train(task: str, s: TaskSize, indices: np.ndarray | None, seed: int) -> nn.Module:
    """Train from scratch on the training examples ``indices`` (all when None) with ``seed``
    (initialisation and batch order). The same recipe for the attributed model and every retraining."""
    torch.manual_seed(seed)
    tr, _ = data(task, s)
    idx = torch.arange(len(tr[0])) if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long)
    tensors = tuple(t[idx] for t in tr)
    model = build(task, s, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n = len(idx)
    steps = s.epochs * math.ceil(n / s.batch_size)
    if task == "cnn":
        opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0 if task == "mlp" else 0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1 - i / steps))
    lf = loss_fn(task)
    model.train()
    for _ in range(s.epochs):
        perm = torch.randperm(n, generator=g)
        for b0 in range(0, n, s.batch_size):
            b = perm[b0:b0 + s.batch_size]
            opt.zero_grad(set_to_none=True)
            losses = lf(model, tuple(t[b] for t in tensors))
            if task == "lm":   # mean token loss for the optimiser; attribution uses the summed loss
                (losses.sum() / (tensors[0][b][:, 1:] != 0).sum().clamp(min=1)).backward()
            else:
                losses.mean().backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def measure(task: str, s: TaskSize, model: nn.Module) -> np.ndarray:
    """(n_query,) loss of every query under ``model`` — the LDS measurement."""
    _, q = data(task, s)
    lf = loss_fn(task)
    model.eval()
    with torch.no_grad():
        return torch.cat([lf(model, tuple(t[i:i + 256] for t in q)) for i in range(0, len(q[0]), 256)]).double().numpy()


def trainer(task: str, s: TaskSize, indices, seed):
    """build_ground_truth's train(indices, seed) (bind task and s with functools.partial)."""
    return train(task, s, indices, seed)


def measurer(task: str, s: TaskSize, model):
    return measure(task, s, model)
