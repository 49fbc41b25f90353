"""Every variant of the comparison as one function ``run(ctx) -> dict``, run in a child process by
run.py. ``ctx`` holds the task's model, data and loss (tasks.py); a variant returns

  {"scores": (n_query, n_train) array in the library's own orientation, "sign": ±1}

for a quality task (run.py multiplies by ``sign`` to reach dropinf's convention, positive =
harmful, then checks the orientation by correlating with dropinf's scores), or {"tokens": N} for
the throughput task. ``ctx.timer`` brackets the attribution (featurize + precondition + score):
model loading and data preparation are outside it, as the model is a given for every library.

Settings, chosen to be each library's documented default where it has one, at comparable bytes:
  dropinf     GaussNewton with the paper's damping rule; Dropout r per layer (r=1024 on the MLP ≈
              LoGra 32×32; r=16 per LoRA matrix on tweets; r=64 per Linear on SmolLM2), and mask
              ensembles (Dropout of r split into K disjoint masks, averaged: rotated members of 1024 on
              the MLP, plain members of 16 on tweets — sizes and rotation picked by sweeps on the
              same checkpoints)
  kronfluence KFAC / EK-FAC, its default true Fisher (labels sampled from the model), damping None
              (its 0.1 × mean-eigenvalue heuristic; the library default 1e-8 is a placeholder)
  LogIX       LoGra (its add_lora) of rank 32 (1024 per layer) on the MLP, 4 on LoRA, 8 on SmolLM2,
              with its KFAC-style covariance preconditioner and default damping; its log buffer flushed
              to disk every 3e7 logged floats (its default 1e9 counts logged floats, but on the tweets
              each buffered example keeps ~30× its logged size alive — measured 9 MB against 0.3 MB —
              so 24 GiB fill before the first flush)
  dattri      LoGra and FactGraSS at the same total dims per layer, eFIM Hessian; TRAK with a
              random_mask and with a normal projection of 1024 dims (whole model, as TRAK does), regularization
              1e-6 (with its default 0, random_mask's 1024 × 1024 kernel is singular on the MLP and
              torch.linalg.solve fails)
  traker      TRAK, BasicProjector (fp32, block_size = proj_dim = 1024) on CPU
  captum      TracInCP on the final checkpoint (one checkpoint), the tracked layers
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class Ctx:
    task: str
    model: nn.Module
    train: object                   # a Dataset
    query: object                   # a Dataset
    loss: object                    # loss(model, batch) -> (B,)
    names: list                     # tracked module names
    seed: int
    batch: int
    timer: object
    workdir: str
    extra: dict = field(default_factory=dict)

    def loader(self, ds, batch=None):
        return DataLoader(ds, batch_size=batch or self.batch, shuffle=False)


def _logits(ctx: Ctx, model, batch):
    """Logits whose rows are the predictive distributions the loss is taken over, and the targets."""
    if ctx.task == "mlp":
        return model(batch[0]), batch[1]
    if ctx.task == "tweets":
        return model(input_ids=batch[0], attention_mask=batch[1]).logits, batch[2]
    ids, mask = batch[0], batch[1]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return logits, ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)


# ------------------------------------------------------------------ dropinf

def dropinf(r: int | None, rotate: bool = False, estimator: str = "gn"):
    """r=None: no compression (the paper's Orig: every coordinate of the tracked layers)."""
    def run(ctx: Ctx):
        from dropinf import Attributor, Dropout, GaussNewton, Identity
        comp = (Identity() if r is None else Dropout(r=r, seed=ctx.seed, rotate=True) if rotate
                else Dropout(r=r, seed=ctx.seed))
        with ctx.timer:     # the paper's damping rule (GaussNewton's default has damping_rn=40)
            attr = Attributor(ctx.model, ctx.loss, compressor=comp, estimator=GaussNewton(damping_rn=0),
                              track=ctx.names, progress=True)
            attr.featurize(ctx.loader(ctx.train))
            scores = attr.score(ctx.loader(ctx.query))
        return {"scores": scores, "sign": 1}
    return run


def dropinf_default(job: str = "auto"):
    """What ``Attributor(model, loss_fn)`` gives with no compressor or estimator (dropinf.default_setting,
    its mask seeded by the round). job "auto": the call a user makes for the task — ``score`` for
    attribution (MLP LDS), ``mislabeled(val)`` for finding flipped labels (tweets: the mislabel
    estimator fitted on the same rows; a (1, n_train) row, the influence on the mean validation
    loss); "score": ``score`` on every task."""
    def run(ctx: Ctx):
        from dropinf import Attributor, default_setting
        with ctx.timer:
            attr = Attributor(ctx.model, ctx.loss, compressor=default_setting(ctx.seed)[0], track=ctx.names,
                              progress=True)
            attr.featurize(ctx.loader(ctx.train))
            if ctx.task == "tweets" and job == "auto":
                scores = attr.mislabeled(ctx.loader(ctx.query))[None]
            else:
                scores = attr.score(ctx.loader(ctx.query))
        return {"scores": scores, "sign": 1}
    return run


def dropinf_ensemble(r: int, members: int, rotate: bool = True):
    """Dropout of r per layer (rotated or not), split into ``members`` disjoint masks of r/members,
    each its own H and damping, scores averaged: GaussNewton(members=K), one fit (dropinf.ensemble)."""
    def run(ctx: Ctx):
        from dropinf import Attributor, Dropout, GaussNewton
        with ctx.timer:
            attr = Attributor(ctx.model, ctx.loss, compressor=Dropout(r=r, seed=ctx.seed, rotate=rotate),
                              estimator=GaussNewton(members=members, member_seed=ctx.seed, damping_rn=0),
                              track=ctx.names,
                              progress=True)
            attr.featurize(ctx.loader(ctx.train))
            scores = attr.score(ctx.loader(ctx.query))
        return {"scores": scores, "sign": 1}
    return run


def plain_pass(ctx: Ctx):
    """The physical limit beside the throughput rows and the tweets rows: one forward+backward of the
    summed loss over the training data, no attribution (every library here needs at least this)."""
    from tqdm.auto import tqdm
    with ctx.timer:
        for b in tqdm(ctx.loader(ctx.train), desc="forward+backward"):
            ctx.model.zero_grad(set_to_none=True)
            ctx.loss(ctx.model, b).sum().backward()
    return {"tokens": ctx.extra.get("tokens")}


def dropinf_featurize(r: int):
    def run(ctx: Ctx):
        from dropinf import Attributor, Dropout
        with ctx.timer:
            attr = Attributor(ctx.model, ctx.loss, compressor=Dropout(r=r, seed=ctx.seed), track=ctx.names)
            attr.featurize(ctx.loader(ctx.train))
        return {"tokens": ctx.extra.get("tokens")}
    return run


# ------------------------------------------------------------------ kronfluence

def kronfluence(strategy: str, score: bool = True):
    def run(ctx: Ctx):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        class KTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                if not sample:
                    return ctx.loss(model, batch).sum()
                logits, target = _logits(ctx, model, batch)
                flat = logits.reshape(-1, logits.shape[-1])
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(flat.detach().float(), -1), 1).view(-1)
                    drawn = drawn.masked_fill(target.reshape(-1) == -100, -100)
                return nn.functional.cross_entropy(flat, drawn, reduction="sum", ignore_index=-100)

            def compute_measurement(self, batch, model):
                return ctx.loss(model, batch).sum()

            def get_influence_tracked_modules(self):
                return list(ctx.names)

            def get_attention_mask(self, batch):
                return batch[1] if ctx.task == "smollm" else None

        torch.manual_seed(ctx.seed)
        with ctx.timer:
            task = KTask()
            model = prepare_model(ctx.model, task)
            an = Analyzer(analysis_name="bench", model=model, task=task, cpu=True, output_dir=ctx.workdir)
            if not score:      # the pass over the data only (its eigendecompositions come after it)
                an.fit_covariance_matrices(factors_name=strategy, dataset=ctx.train, per_device_batch_size=ctx.batch,
                                           factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
                return {"tokens": ctx.extra.get("tokens")}
            an.fit_all_factors(factors_name=strategy, dataset=ctx.train, per_device_batch_size=ctx.batch,
                               factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
            an.compute_pairwise_scores(scores_name="s", factors_name=strategy, query_dataset=ctx.query,
                                       train_dataset=ctx.train, per_device_query_batch_size=len(ctx.query),
                                       per_device_train_batch_size=ctx.batch,
                                       score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
            scores = an.load_pairwise_scores("s")["all_modules"]
        return {"scores": scores.float().numpy(), "sign": -1}
    return run


# ------------------------------------------------------------------ LogIX

def logix(rank: int, score: bool = True):
    def run(ctx: Ctx):
        from logix import LogIX
        from logix.config import LoggingConfig, LoRAConfig
        os.chdir(ctx.workdir)                      # LogIX logs under ./logix/PROJECT
        masked = ctx.task == "smollm"
        log_cfg = LoggingConfig()
        log_cfg.flush_threshold = 30_000_000       # see the module docstring
        with ctx.timer:
            lx = LogIX(project="bench", logging_config=log_cfg)
            lx.watch(ctx.model, name_filter=list(ctx.names))
            if rank:           # rank 0: log the tracked gradients as they are (LogIX's LoRA replaces peft's
                lx.add_lora(lora_config=LoRAConfig(rank=rank))   # lora_A/lora_B modules, which peft then cannot run)
            lx.setup({"grad": ["log", "covariance"]})
            lx.save(True)
            n = 0
            from tqdm.auto import tqdm
            for b in tqdm(ctx.loader(ctx.train), desc="LogIX log train"):
                ids = [str(n + j) for j in range(len(b[0]))]
                n += len(ids)
                with lx(data_id=ids, mask=b[1] if masked else None):
                    ctx.model.zero_grad(set_to_none=True)
                    ctx.loss(ctx.model, b).sum().backward()
            lx.finalize()
            if not score:
                return {"tokens": ctx.extra.get("tokens")}
            log_loader = lx.build_log_dataloader(batch_size=256)
            lx.setup({"grad": ["log"]})
            lx.eval()
            out = []
            for b in ctx.loader(ctx.query):
                ids = [f"q{j}" for j in range(len(b[0]))]
                with lx(data_id=ids):
                    ctx.model.zero_grad(set_to_none=True)
                    ctx.loss(ctx.model, b).sum().backward()
                res = lx.compute_influence_all(lx.get_log(), log_loader)
                order = np.argsort(np.asarray([int(t) for t in res["tgt_ids"]]))
                out.append(res["influence"].float().cpu().numpy()[:, order])
        return {"scores": np.concatenate(out), "sign": -1}
    return run


# ------------------------------------------------------------------ dattri

def dattri_block(kind: str, proj_dim: int, score: bool = True):
    def run(ctx: Ctx):
        from dattri.task import AttributionTask
        if kind == "logra":
            from dattri.algorithm.logra import LoGraAttributor as A
        else:
            from dattri.algorithm.factgrass import FactGraSSAttributor as A

        keys = {"mlp": None, "tweets": ("input_ids", "attention_mask", "labels"),
                "smollm": ("input_ids", "attention_mask")}[ctx.task]

        def loss(model, batch, device):
            batch = [batch[k] for k in keys] if keys else batch
            return ctx.loss(model, [t.to(device) for t in batch]).sum()
        train, query = (ctx.train, ctx.query) if keys is None else (_Dicts(ctx.train, keys), _Dicts(ctx.query, keys))
        os.chdir(ctx.workdir)                      # dattri writes batch_metadata.json into the working directory
        torch.manual_seed(ctx.seed)
        with ctx.timer:
            task = AttributionTask(loss_func=loss, model=ctx.model, checkpoints=ctx.model.state_dict())
            at = A(task=task, layer_names=list(ctx.names), hessian="eFIM", device="cpu", proj_dim=proj_dim,
                   offload="cpu")
            at.cache(ctx.loader(train))
            if not score:
                return {"tokens": ctx.extra.get("tokens")}
            scores = at.attribute(ctx.loader(train), ctx.loader(query))              # (n_train, n_query)
        return {"scores": scores.float().numpy().T, "sign": -1}
    return run


class _Dicts(torch.utils.data.Dataset):
    """Tuple items as dicts: dattri's block-projected set-up calls model(**batch) on dicts, but
    model(batch[0][0]) — one example without its batch dimension — on tuples."""

    def __init__(self, ds, keys):
        self.ds, self.keys = ds, keys

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return dict(zip(self.keys, self.ds[i]))


def dattri_trak(proj_type: str, proj_dim: int = 1024):
    def run(ctx: Ctx):
        from dattri.algorithm.trak import TRAKAttributor
        from dattri.task import AttributionTask
        model = ctx.model

        def f(params, data):
            x, y = data
            out = torch.func.functional_call(model, params, x.unsqueeze(0))
            return nn.functional.cross_entropy(out, y.unsqueeze(0))

        def m(params, data):
            return torch.exp(-f(params, data))
        with ctx.timer:
            task = AttributionTask(loss_func=f, model=model, checkpoints=model.state_dict())
            at = TRAKAttributor(task=task, correct_probability_func=m, device="cpu", regularization=1e-6,
                                projector_kwargs={"proj_dim": proj_dim, "proj_type": proj_type, "device": "cpu",
                                                  "proj_seed": ctx.seed})
            at.cache(ctx.loader(ctx.train))
            scores = at.attribute(ctx.loader(ctx.query))                             # (n_train, n_query)
        return {"scores": scores.float().numpy().T, "sign": -1}
    return run


# ------------------------------------------------------------------ traker (the TRAK authors' library)

def traker(proj_dim: int = 1024):
    def run(ctx: Ctx):
        from trak import TRAKer
        from trak.projectors import BasicProjector, ProjectionType
        model = ctx.model
        grad_dim = sum(p.numel() for p in model.parameters())
        with ctx.timer:
            proj = BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=ctx.seed, proj_type=ProjectionType.normal,
                                  device="cpu", block_size=proj_dim, dtype=torch.float32)
            tr = TRAKer(model=model, task="image_classification", train_set_size=len(ctx.train),
                        save_dir=os.path.join(ctx.workdir, "trak"), device="cpu", projector=proj, proj_dim=proj_dim,
                        use_half_precision=False)
            tr.load_checkpoint(model.state_dict(), model_id=0)
            from tqdm.auto import tqdm
            for b in tqdm(ctx.loader(ctx.train), desc="traker featurize"):
                tr.featurize(batch=list(b), num_samples=len(b[0]))
            tr.finalize_features()
            proj.generate_sketch_matrix(proj.generator_states[0])     # finalize_features freed it
            tr.start_scoring_checkpoint(exp_name="q", checkpoint=model.state_dict(), model_id=0,
                                        num_targets=len(ctx.query))
            for b in ctx.loader(ctx.query):
                tr.score(batch=list(b), num_samples=len(b[0]))
            scores = tr.finalize_scores(exp_name="q")                              # (n_train, n_query)
        return {"scores": np.asarray(scores, dtype=np.float32).T, "sign": -1}
    return run


# ------------------------------------------------------------------ captum

class _Logits(nn.Module):
    """captum calls model(*inputs) and wants a logits tensor."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids, mask):
        return self.m(input_ids=ids, attention_mask=mask).logits


def captum_tracin(ctx: Ctx):
    from captum.influence import TracInCP
    model, names = ctx.model, list(ctx.names)
    if ctx.task == "tweets":
        model, names = _Logits(model), ["m." + n for n in names]
    path = os.path.join(ctx.workdir, "ckpt.pt")
    torch.save(model.state_dict(), path)

    def load(m, p):
        m.load_state_dict(torch.load(p))
        return 1.0
    with ctx.timer:
        tc = TracInCP(model, train_dataset=ctx.train, checkpoints=[path], checkpoints_load_func=load,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum" if ctx.task == "mlp" else "none"), batch_size=ctx.batch,
                      sample_wise_grads_per_batch=ctx.task == "mlp", layers=names)
        q = next(iter(ctx.loader(ctx.query, batch=len(ctx.query))))
        scores = tc.influence(tuple(q), k=None, show_progress=True)
    return {"scores": scores.float().numpy(), "sign": -1}


# ------------------------------------------------------------------ the registry

_MLP = {
    "dropinf default": dropinf_default(),
    "dropinf Dropout r=1024": dropinf(1024),
    "dropinf Dropout+rot r=1024": dropinf(1024, rotate=True),
    "dropinf Dropout+rot r=4096": dropinf(4096, rotate=True),
    "dropinf Dropout+rot r=2048 x2 ens.": dropinf_ensemble(2048, 2),
    "dropinf Dropout+rot r=4096 x4 ens.": dropinf_ensemble(4096, 4),
    "kronfluence KFAC": kronfluence("kfac"),
    "kronfluence EK-FAC": kronfluence("ekfac"),
    "LogIX LoGra 32x32": logix(32),
    "dattri LoGra 32x32": dattri_block("logra", 1024),
    "dattri FactGraSS 1024": dattri_block("factgrass", 1024),
    "dattri TRAK random_mask 1024": dattri_trak("random_mask"),
    "dattri TRAK normal 1024": dattri_trak("normal"),
    "traker TRAK 1024": traker(),
    "captum TracInCP": captum_tracin,
}
_TWEETS = {
    "dropinf default": dropinf_default(),
    "dropinf default, score()": dropinf_default("score"),
    "dropinf Dropout r=16": dropinf(16),
    "plain forward+backward": plain_pass,
    "dropinf Dropout r=512 x32 ens.": dropinf_ensemble(512, 32, rotate=False),
    "kronfluence KFAC": kronfluence("kfac"),
    "kronfluence EK-FAC": kronfluence("ekfac"),
    "LogIX (LoRA grads, KFAC)": logix(0),
    "dattri LoGra 4x4": dattri_block("logra", 16),
    "dattri FactGraSS 64": dattri_block("factgrass", 64),
    "captum TracInCP": captum_tracin,
}
_SMOLLM = {
    "plain forward+backward": plain_pass,
    "dropinf Dropout r=64 (featurize)": dropinf_featurize(64),
    "kronfluence KFAC (factors)": kronfluence("kfac", score=False),
    "LogIX LoGra 8x8 (log)": logix(8, score=False),
    "dattri LoGra 8x8 (cache)": dattri_block("logra", 64, score=False),
}
METHODS = {"mlp": _MLP, "tweets": _TWEETS, "smollm": _SMOLLM}
BATCH = {"mlp": 256, "tweets": 32, "smollm": 4}
