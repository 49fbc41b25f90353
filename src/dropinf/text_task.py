"""The command line without a Python file, for Hugging Face causal LMs and text files.

    dropinf featurize --model ./my-model [--adapter ./lora] --data train.jsonl --store grads/
    dropinf topk      --model ./my-model --data train.jsonl --store grads/ \
                      --prompt "The capital of Freedonia is" --completion " Sylvania" -k 10
    dropinf report    --model ./my-model --data train.jsonl --store grads/ --queries q.jsonl

``TextTaskOptions`` (the flags) → a ``Task`` as an entry point would return it: the model from a
local folder (transformers, ``local_files_only``; a peft adapter on top, its LoRA weights
trainable and so tracked), the training documents (``dropinf.lm.documents``) from a .jsonl /
.csv file (a text field) or a .txt file (one document per non-empty line), the queries
(``dropinf.lm.prompts``) from --prompt/--completion pairs or a .jsonl / .csv file with
``prompt`` and ``completion`` fields, the loss ``dropinf.lm.lm_loss()`` (on a query batch, whose
prompt is masked, that is −log p(completion | prompt)) and a renderer for the report. Nothing is
fetched from a hub.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, MissingDataError
from .options import option


@dataclass(frozen=True)
class TextTaskOptions:
    model: str | None = option(None, "a local Hugging Face causal-LM folder (config, weights, tokenizer): "
                                     "attribute without a Python entry point")
    adapter: str | None = option(None, "a local peft adapter folder loaded on --model (its LoRA weights are tracked)")
    data: str | None = option(None, "the training documents: a local .jsonl or .csv file (one document per record, "
                                    "--text-field) or .txt file (one document per non-empty line)")
    text_field: str = option("text", "the field holding a document's text in --data")
    queries: str | None = option(None, "the queries: a .jsonl or .csv file with 'prompt' and 'completion' fields "
                                       "(or give --prompt/--completion)")
    max_length: int = option(512, "tokens kept per document and per query")
    batch_size: int = option(8, "documents per batch")


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        raise MissingDataError(f"{path} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}, line {i}: not JSON ({exc.msg})") from exc
        return out
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise ConfigError(f"{path}: give a .jsonl, .csv or .txt file")


def _field(records: list[dict], field: str, path: Path) -> list[str]:
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict) or field not in r:
            have = sorted(r) if isinstance(r, dict) else type(r).__name__
            raise ConfigError(f"{path}, record {i}: no field {field!r} (it has {have}); name the text field "
                              f"with --text-field")
    return [str(r[field]) for r in records]


def read_documents(path: str, text_field: str = "text") -> list[str]:
    p = Path(path)
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise MissingDataError(f"{p} does not exist (or is not a file)")
        docs = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        docs = _field(_records(p), text_field, p)
    if not docs:
        raise ConfigError(f"{p} holds no documents")
    return docs


def read_queries(path: str | None, prompts: list[str] | None, completions: list[str] | None):
    prompts, completions = list(prompts or []), list(completions or [])
    if len(prompts) != len(completions):
        raise ConfigError(f"{len(prompts)} --prompt but {len(completions)} --completion: give one completion per prompt")
    if path:
        p = Path(path)
        recs = _records(p)
        prompts += _field(recs, "prompt", p)
        completions += _field(recs, "completion", p)
    return prompts, completions


def load_model(folder: str, adapter: str | None = None):
    """(model, tokenizer) from local folders only."""
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError("--model needs transformers: pip install 'dropinf[hf]'") from exc
    if not Path(folder).is_dir():
        raise MissingDataError(f"--model {folder}: no such folder (a local Hugging Face model folder; nothing is "
                               f"downloaded)")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model {folder}: cannot load a causal LM and its tokenizer from it ({exc})") from exc
    if adapter:
        try:
            import peft
        except ImportError as exc:
            raise ConfigError("--adapter needs peft: pip install 'dropinf[hf]'") from exc
        if not Path(adapter).is_dir():
            raise MissingDataError(f"--adapter {adapter}: no such folder")
        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
    return model.float().eval(), tok


def build_task(o: TextTaskOptions, prompts=None, completions=None):
    """The Task that ``dropinf.entry.load_entry`` would return for these options."""
    from . import lm
    from .entry import Task
    if not o.data:
        raise ConfigError("--model needs --data: the training documents file")
    model, tok = load_model(o.model, o.adapter)
    train = lm.documents(tok, read_documents(o.data, o.text_field), o.max_length)
    ps, cs = read_queries(o.queries, prompts, completions)
    query = lm.prompts(tok, ps, cs, o.max_length) if ps else None

    def render(example):
        ids, labels = example
        shown = [t for t, lab in zip(ids, labels) if lab != -100]
        if len(shown) == len(ids):
            return {"text": tok.decode(ids, skip_special_tokens=True)}
        prompt = tok.decode(ids[:len(ids) - len(shown)], skip_special_tokens=True)
        return {"text": f"{prompt} ▶ {tok.decode(shown, skip_special_tokens=True)}"}

    return Task(model, lm.lm_loss(), train, query, train.collate, o.batch_size,
                {"completion": lm.completion_loss}, {"render": render, "tokenizer": tok,
                                                     "token_measure": lm.token_losses})
