"""Which parts of the model are tracked, and how each one's parameter vector is laid out.

A *layer* (parameter block) is one module together with its own trainable parameters. Its
parameter vector, of length ``d_l``, is the concatenation of those parameters flattened in
row-major order: for ``nn.Linear`` that is ``weight`` (d_out × d_in, so entry ``o*d_in + k`` is
``W[o, k]``) followed by ``bias`` (d_out). Every compressor, estimator and index set refers to
this layout.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence, Union

from torch import nn
from torch.nn.utils.parametrize import is_parametrized

from ..errors import ConfigError, NoTrackableLayersError
from .modules import UseSpec, fused_kind, use_spec

#: what ``track=`` accepts: None (every nn.Linear and HF Conv1D), "all" (every module owning
#: trainable parameters), "lora" (the trainable peft LoRA modules), or a sequence of items, OR-ed:
#: a module name / glob pattern (the module and everything inside it), a module type, or a tuple
#: of those that must all hold — ``(nn.Linear, "model.layers.*")``: every nn.Linear inside the
#: decoder layers. Blocks always come in the model's module order, whatever the order of items.
TrackSpec = Union[None, str, Sequence[Union[str, type, tuple]]]



@dataclass(frozen=True)
class LayerSpec:
    """One tracked parameter block.

    name:         qualified name of the (first) module owning it
    kind:         "fused" (module hooks; see capture.modules) or "func" (torch.func fallback)
    param_names:  qualified parameter names, in the order of the block's parameter vector
    param_shapes: their shapes
    uses:         for fused blocks, every module that uses the block's weight (several when
                  weights are tied, e.g. input embedding and LM head); their gradients add up
    """

    name: str
    kind: str
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    uses: tuple[UseSpec, ...] = ()

    @property
    def dim(self) -> int:
        """d_l, the length of this block's parameter vector."""
        total = 0
        for shape in self.param_shapes:
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "params": list(self.param_names),
                "shapes": [list(s) for s in self.param_shapes],
                "uses": [f"{u.module}:{u.kind}" for u in self.uses]}


def _own_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's trainable parameters, those behind its parametrized tensors included
    (``parametrizations.weight.original0``, ... of torch.nn.utils.parametrize, registered on a
    child ParametrizationList): the block's gradient is taken with respect to what is registered."""
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if is_parametrized(module):
        own += [(f"parametrizations.{n}", p) for n, p in module.parametrizations.named_parameters()
                if p.requires_grad]
    return own


def _fused_parts(name: str, module: nn.Module):
    """(kind, weight, bias or None) if the module has a fused hook and a trainable weight Parameter.
    A weight computed from other parameters (torch.nn.utils.parametrizations, the older
    weight_norm/spectral_norm hooks) is not: its gradient belongs to those, so torch.func takes it."""
    kind = fused_kind(module)
    if kind is None or is_parametrized(module) or not isinstance(module._parameters.get("weight"), nn.Parameter) \
            or not module.weight.requires_grad:
        return None
    bias = getattr(module, "bias", None)
    return kind, module.weight, (bias if isinstance(bias, nn.Parameter) and bias.requires_grad else None)


def functional_users(model: nn.Module) -> dict[str, str]:
    """Modules whose weight the model applies without calling the module, mapped to the reason:
    ``nn.MultiheadAttention`` reads ``out_proj.weight`` inside F.multi_head_attention_forward, so
    a hook on out_proj never fires. These blocks go through the torch.func fallback."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            for child, _ in m.named_children():
                out[f"{name}.{child}" if name else child] = "nn.MultiheadAttention applies it functionally"
    return out


def _build_specs(model: nn.Module, chosen: list[str], fused: bool) -> list[LayerSpec]:
    modules = dict(model.named_modules())
    functional = functional_users(model)
    pname = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    # every module *registering* each weight Parameter (tied weights have several). Wrappers that
    # only expose a child's weight as an attribute (peft's ModulesToSaveWrapper) are not users.
    users: dict[int, list[str]] = {}
    for n, m in modules.items():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if isinstance(w, nn.Parameter):
            users.setdefault(id(w), []).append(n)
    blocks: list[dict] = []
    by_weight: dict[int, dict] = {}
    placed: set[str] = set()

    def add_use(blk: dict, n: str, kind: str, b) -> None:
        bias_at = None
        if b is not None:
            bias_at = blk["dim"]
            blk["params"].append((f"{n}.bias" if n else "bias", tuple(b.shape)))
            blk["dim"] += b.numel()
        blk["uses"].append(use_spec(n, modules[n], kind, bias_at))
        placed.add(n)

    for n in chosen:
        m = modules[n]
        own = _own_trainable(m)
        if not own or n in placed:
            continue
        parts = _fused_parts(n, m) if fused and n not in functional else None
        if parts is None:
            prefix = f"{n}." if n else ""
            blocks.append({"name": n, "kind": "func", "params": [(prefix + k, tuple(p.shape)) for k, p in own],
                           "uses": []})
            placed.add(n)
            if is_parametrized(m):   # its ParametrizationList's parameters belong to this block
                placed.update(f"{prefix}{c}".rstrip(".") for c, _ in m.parametrizations.named_modules(prefix="parametrizations"))
            continue
        kind, w, b = parts
        blk = {"name": n, "kind": "fused", "params": [(pname[id(w)], tuple(w.shape))], "uses": [], "dim": w.numel()}
        by_weight[id(w)] = blk
        blocks.append(blk)
        add_use(blk, n, kind, b)
        # a tied weight's per-example gradient is the sum over every module using it
        for other in users.get(id(w), []):
            if other == n or other in placed:
                continue
            oparts = _fused_parts(other, modules[other])
            if oparts is None:
                raise ConfigError(
                    f"the weight of {n!r} is tied to module {other!r} ({type(modules[other]).__name__}), "
                    f"which has no fused hook; its gradient would be incomplete. Untie the weights or "
                    f"track these modules with CaptureOptions(fused=False).")
            add_use(blk, other, oparts[0], oparts[2])
    return [LayerSpec(b["name"], b["kind"], tuple(p for p, _ in b["params"]), tuple(s for _, s in b["params"]),
                      tuple(b["uses"])) for b in blocks]


def _matches(name: str, module: nn.Module, item: Union[str, type]) -> bool:
    if isinstance(item, type):
        return isinstance(module, item)
    if not isinstance(item, str):
        raise ConfigError(f"track entries are module names, glob patterns, module types or tuples of those; "
                          f"got {item!r}")
    return name == item or fnmatch.fnmatchcase(name, item)


def _selected(chain: list[tuple[str, nn.Module]], item) -> bool:
    """Whether one ``track`` item selects a module, given ``chain`` (the module and its ancestors):
    a name, glob or type selects a matching module and everything inside it; a tuple selects what
    every one of its members selects."""
    if isinstance(item, tuple):
        return bool(item) and all(_selected(chain, part) for part in item)
    return any(_matches(n, m, item) for n, m in chain)


def select_layers(model: nn.Module, track: TrackSpec = None, fused: bool = True) -> list[LayerSpec]:
    """Resolve ``track`` into the ordered list of tracked blocks.

    ``fused=False`` routes every block through the torch.func fallback (used by benchmarks and
    as an independent path in tests). Raises NoTrackableLayersError when nothing is selected.
    ``track="lora"`` selects exactly the trainable peft LoRA modules.
    """
    modules = dict(model.named_modules())
    if track is None:
        chosen = [n for n, m in modules.items() if fused_kind(m) in ("linear", "conv1d") and _own_trainable(m)]
        what = "every nn.Linear (and HF Conv1D) with trainable parameters"
    elif isinstance(track, str) and track == "lora":
        chosen = [n for n, m in modules.items() if _is_lora_piece(n) and _own_trainable(m)]
        what = "the trainable LoRA modules (lora_A / lora_B)"
    elif isinstance(track, str) and track == "all":
        chosen = [n for n, m in modules.items() if _own_trainable(m)]
        what = "every module owning trainable parameters"
    else:
        items = [track] if isinstance(track, (str, type, tuple)) else list(track)
        what = f"track={items!r}"
        chains = {n: [(a, modules[a]) for a in _ancestors(n)] for n in modules}
        hit = set()
        for item in items:
            hits = {n for n in modules if _selected(chains[n], item)}
            if not hits:
                raise ConfigError(
                    f"track entry {item!r} matches no module of the model. Module names look like "
                    f"{[n for n in list(modules)[1:6]]}...; use exact names, glob patterns, types or "
                    f"(type, pattern) tuples.")
            hit |= hits
        # in the model's module order (what a selected container holds is selected with it)
        chosen = [n for n, m in modules.items() if n in hit and _own_trainable(m)]
    specs = _build_specs(model, chosen, fused)
    if not specs:
        types = sorted({type(m).__name__ for m in modules.values() if _own_trainable(m)})
        raise NoTrackableLayersError(
            f"no trackable layer found for {what}. Modules with trainable parameters in this "
            f"model have types {types or 'none (every parameter has requires_grad=False)'}; pass "
            f"track=[names or types] (e.g. track='all') or unfreeze the parameters to attribute.")
    _check_shared(specs, model)
    return specs


def _ancestors(name: str) -> list[str]:
    """``name`` and the names of the modules containing it ("" is the model itself)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:k]) for k in range(len(parts), -1, -1)]


def _is_lora_piece(name: str) -> bool:
    """peft names its adapters e.g. ...query.lora_A.default (a Linear in a ModuleDict)."""
    return any(p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") for p in name.split("."))


def _check_shared(specs: list[LayerSpec], model: nn.Module) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    owner: dict[int, str] = {}
    for s in specs:
        for pn in s.param_names:
            pid = id(params[pn])
            if pid in owner and owner[pid] != s.name:
                raise ConfigError(
                    f"parameter {pn} is shared by tracked blocks {owner[pid]} and {s.name}, and one of "
                    f"them has no fused hook; tied weights are supported between fused modules only "
                    f"(Linear, Conv1D, Conv2d, Embedding). Track only one of them.")
            owner[pid] = s.name


def output_layer(model: nn.Module, specs: list[LayerSpec]) -> str | None:
    """The tracked block of the model's output layer — the last module, in the model's module order,
    that registers parameters of its own (the head of a classifier or language model: ``fc``,
    ``classifier``, ``lm_head``, a peft ``modules_to_save`` copy) — or None when that module is not
    tracked (a LoRA-only track, a frozen head). GaussNewton(head_damping=...) damps it apart."""
    last = None
    for name, m in model.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if own:
            last = (name, f"{name}.{own[0]}" if name else own[0])
    if last is None:
        return None
    module, param = last
    for s in specs:
        if param in s.param_names or module in {u.module for u in s.uses}:
            return s.name
    return None
