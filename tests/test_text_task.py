"""The zero-code command line: featurize → topk → report on a tiny random HF causal LM (with a peft
adapter) saved to a folder and a .jsonl file, with no Python task file."""

import json

import pytest
import torch

from dropinf import ConfigError, MissingDataError
from dropinf.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the capital of freedonia is sylvania cats sit on mats dogs run fast paris france".split()


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]"] + WORDS)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                               bos_token="[BOS]")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(root / "adapter")
    docs = ["the capital of freedonia is sylvania", "cats sit on mats", "dogs run fast", "paris is the capital of france"]
    (root / "train.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (root / "queries.jsonl").write_text(json.dumps({"prompt": "the capital of freedonia is", "completion": " sylvania"})
                                        + "\n")
    return root


def test_featurize_topk_report_without_python(lm_folder, tmp_path, capsys):
    base = ["--model", str(lm_folder / "model"), "--adapter", str(lm_folder / "adapter"),
            "--data", str(lm_folder / "train.jsonl"), "--text-field", "body", "--store", str(tmp_path / "s"),
            "--no-progress"]
    assert main(["featurize", *base, "--size", "8"]) == 0
    info = json.loads(capsys.readouterr().out)
    from dropinf.store.disk import FeatureStore
    names = FeatureStore.open(tmp_path / "s").layer_names()
    assert info["n"] == 4 and names and all("lora" in n for n in names)          # the adapter is tracked
    assert main(["topk", *base, "--prompt", "the capital of freedonia is", "--completion", " sylvania",
                 "--prompt", "dogs", "--completion", " run", "-k", "2"]) == 0
    top = json.loads(capsys.readouterr().out)
    assert len(top["harmful_idx"]) == 2 and len(top["helpful_idx"][0]) == 2
    out = tmp_path / "r.html"
    assert main(["report", *base, "--queries", str(lm_folder / "queries.jsonl"), "-k", "2", "--out", str(out)]) == 0
    page = out.read_text()
    assert "freedonia" in page and "sylvania" in page


def test_text_task_mistakes_are_named(lm_folder, tmp_path, capsys):
    from dropinf.text_task import read_documents, read_queries
    with pytest.raises(ConfigError, match="no field 'text'"):
        read_documents(str(lm_folder / "train.jsonl"))
    with pytest.raises(MissingDataError):
        read_documents(str(tmp_path / "none.jsonl"))
    with pytest.raises(ConfigError, match="one completion per prompt"):
        read_queries(None, ["a", "b"], ["c"])
    (tmp_path / "t.txt").write_text("first doc\n\nsecond doc\n")
    assert read_documents(str(tmp_path / "t.txt")) == ["first doc", "second doc"]
    assert main(["featurize", "--store", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "--model FOLDER --data FILE" in capsys.readouterr().err
    assert main(["featurize", "--model", str(tmp_path / "nowhere"), "--data", "x.jsonl", "--store",
                 str(tmp_path / "s")]) == 2
    assert "no such folder" in capsys.readouterr().err
