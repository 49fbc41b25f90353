"""How one example is shown in a report: text, an inline image, a label.

A render hook is ``render(example) -> str | image | dict``, called with ``dataset[i]``:

    str                 shown as text (escaped)
    image               a (H, W), (1|3, H, W) or (H, W, 3) tensor / array: shown inline as PNG
    dict                any of {"text": str, "image": image, "label": str|int}

``default_render(tokenizer, label_names)`` handles the common datasets: dict items with
``input_ids`` (decoded by the tokenizer, padding removed; token ids without one), tuples
``(image, label)`` / ``(features, label)``, and plain strings; the label is taken from
``labels``/``label`` or the tuple's last element.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ConfigError


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def is_image(x) -> bool:
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        return False
    a = _np(x)
    if not np.issubdtype(a.dtype, np.floating) and a.dtype != np.uint8:
        return False
    return (a.ndim == 2 and min(a.shape) >= 4) or (a.ndim == 3 and (a.shape[0] in (1, 3) or a.shape[2] in (1, 3))
                                                  and min(a.shape[:2] if a.shape[2] in (1, 3) else a.shape[1:]) >= 4)


def png_data_url(x, size: int = 96) -> str:
    """An image tensor/array as an inline data:image/png URL (min-max scaled, upsampled to ~size px)."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError("showing images in a report needs Pillow: pip install pillow") from exc
    a = _np(x).astype(np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    img = Image.fromarray((a * 255).round().astype(np.uint8))
    scale = max(1, size // max(img.size))
    img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _scalar(x) -> Any:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    if isinstance(x, np.ndarray) and x.size == 1:
        return x.item()
    return x if isinstance(x, (int, float, str, np.integer)) else None


def default_render(tokenizer=None, label_names=None) -> Callable:
    """A render hook for dict items with input_ids, (x, y) tuples, images and strings."""
    def name(y):
        y = _scalar(y)
        if y is None:
            return None
        if label_names is not None and isinstance(y, (int, np.integer)) and 0 <= int(y) < len(label_names):
            return f"{label_names[int(y)]} ({int(y)})"
        return str(y)

    def ids_text(ids, mask=None):
        ids = _np(ids).reshape(-1)
        if mask is not None:
            ids = ids[_np(mask).reshape(-1).astype(bool)]
        if tokenizer is not None:
            return tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        return "token ids: " + " ".join(map(str, ids.tolist()[:64])) + (" …" if len(ids) > 64 else "")

    def render(ex):
        if isinstance(ex, str):
            return {"text": ex}
        if isinstance(ex, dict) or hasattr(ex, "keys"):
            out = {}
            if "input_ids" in ex:
                out["text"] = ids_text(ex["input_ids"], ex.get("attention_mask"))
            elif "text" in ex:
                out["text"] = str(ex["text"])
            for k in ("pixel_values", "image"):
                if k in ex and is_image(ex[k]):
                    out["image"] = ex[k]
            for k in ("labels", "label"):
                if k in ex and name(ex[k]) is not None:
                    out["label"] = name(ex[k])
            return out
        if isinstance(ex, (tuple, list)) and ex:
            out = {}
            x = ex[0]
            if is_image(x):
                out["image"] = x
            elif isinstance(x, torch.Tensor) and not torch.is_floating_point(x) and x.dim() == 1:
                out["text"] = ids_text(x, ex[1] if len(ex) > 2 and isinstance(ex[1], torch.Tensor)
                                       and ex[1].shape == x.shape else None)
            elif isinstance(x, str):
                out["text"] = x
            else:
                a = _np(x).reshape(-1)
                out["text"] = "[" + ", ".join(f"{v:.3g}" for v in a[:8]) + (", …]" if a.size > 8 else "]")
            if len(ex) > 1 and name(ex[-1]) is not None:
                out["label"] = name(ex[-1])
            return out
        if is_image(ex):
            return {"image": ex}
        return {"text": repr(ex)[:500]}
    return render


def show(render: Callable, example, max_chars: int = 2000) -> dict:
    """Run a render hook and normalise its result to JSON: {"text", "img", "label"} (absent = none)."""
    got = render(example)
    if isinstance(got, str) or is_image(got):
        got = {"text": got} if isinstance(got, str) else {"image": got}
    if not isinstance(got, dict):
        raise ConfigError(f"a report's render hook must return str, an image tensor or a dict with text/image/label; "
                          f"got {type(got).__name__}")
    out = {}
    if got.get("text") is not None:
        t = str(got["text"])
        out["text"] = t if len(t) <= max_chars else t[:max_chars] + " …"
    if got.get("image") is not None:
        out["img"] = png_data_url(got["image"])
    if got.get("label") is not None:
        out["label"] = str(got["label"])
    return out
