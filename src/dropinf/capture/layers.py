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

import torch
from torch import nn

from ..errors import ConfigError, NoTrackableLayersError

#: what ``track=`` accepts: None (every nn.Linear), "all" (every module owning trainable
#: parameters), or a sequence of module names / glob patterns and module types.
TrackSpec = Union[None, str, Sequence[Union[str, type]]]

FUSED_KINDS = {nn.Linear: "linear"}


@dataclass(frozen=True)
class LayerSpec:
    """One tracked parameter block.

    name:         qualified module name (as in ``model.named_modules()``)
    kind:         "linear" (fused hook) or "func" (torch.func fallback)
    param_names:  qualified parameter names, in the order of the block's parameter vector
    param_shapes: their shapes
    """

    name: str
    kind: str
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]

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

    @property
    def has_bias(self) -> bool:
        return self.kind == "linear" and len(self.param_names) == 2

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "params": list(self.param_names),
                "shapes": [list(s) for s in self.param_shapes]}


def _own_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def _spec_for(name: str, module: nn.Module, fused: bool) -> LayerSpec | None:
    own = _own_trainable(module)
    if not own:
        return None
    prefix = f"{name}." if name else ""
    if fused and isinstance(module, nn.Linear) and module.weight.requires_grad:
        names = ["weight"] + (["bias"] if module.bias is not None and module.bias.requires_grad else [])
        shapes = [tuple(getattr(module, n).shape) for n in names]
        return LayerSpec(name, "linear", tuple(prefix + n for n in names), tuple(shapes))
    return LayerSpec(name, "func", tuple(prefix + n for n, _ in own), tuple(tuple(p.shape) for _, p in own))


def _matches(name: str, module: nn.Module, item: Union[str, type]) -> bool:
    if isinstance(item, type):
        return isinstance(module, item)
    return name == item or fnmatch.fnmatchcase(name, item)


def select_layers(model: nn.Module, track: TrackSpec = None, fused: bool = True) -> list[LayerSpec]:
    """Resolve ``track`` into the ordered list of tracked blocks.

    ``fused=False`` routes every block through the torch.func fallback (used by benchmarks and
    as an independent path in tests). Raises NoTrackableLayersError when nothing is selected.
    """
    modules = dict(model.named_modules())
    if track is None:
        chosen = [n for n, m in modules.items() if isinstance(m, nn.Linear) and _own_trainable(m)]
        what = "every nn.Linear with trainable parameters"
    elif isinstance(track, str) and track == "all":
        chosen = [n for n, m in modules.items() if _own_trainable(m)]
        what = "every module owning trainable parameters"
    else:
        items = [track] if isinstance(track, (str, type)) else list(track)
        chosen, what = [], f"track={items!r}"
        for item in items:
            hits = [n for n, m in modules.items() if _matches(n, m, item)]
            if not hits:
                raise ConfigError(
                    f"track entry {item!r} matches no module of the model. Module names look like "
                    f"{[n for n in list(modules)[1:6]]}...; use exact names, glob patterns or types.")
            for n in hits:
                # a container selects its descendants that own trainable parameters
                sub = [f"{n}.{c}" if n else c for c, m in modules[n].named_modules()
                       if _own_trainable(m)]
                chosen.extend(s.rstrip(".") for s in sub)
    seen, specs = set(), []
    for n in chosen:
        if n in seen:
            continue
        seen.add(n)
        spec = _spec_for(n, modules[n], fused)
        if spec is not None:
            specs.append(spec)
    if not specs:
        types = sorted({type(m).__name__ for m in modules.values() if _own_trainable(m)})
        raise NoTrackableLayersError(
            f"no trackable layer found for {what}. Modules with trainable parameters in this "
            f"model have types {types or 'none (every parameter has requires_grad=False)'}; pass "
            f"track=[names or types] (e.g. track='all') or unfreeze the parameters to attribute.")
    _check_shared(specs, model)
    return specs


def _check_shared(specs: list[LayerSpec], model: nn.Module) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    owner: dict[int, str] = {}
    for s in specs:
        for pn in s.param_names:
            pid = id(params[pn])
            if pid in owner and owner[pid] != s.name:
                raise ConfigError(
                    f"parameter {pn} is shared by tracked modules {owner[pid]} and {s.name}; "
                    f"track only one of them (tied weights are not supported yet).")
            owner[pid] = s.name


def module_map(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def param_map(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))
