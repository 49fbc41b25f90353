"""dropinf.lm on a tiny random HF causal LM: the per-document loss and the prompt/completion batches
against token NLLs computed by hand, and every misuse answered with a DropinfError naming the fix."""

import warnings

import pytest
import torch

from dropinf import Attributor, ConfigError, Dropout, DropinfError, LossShapeError, lm
from dropinf.measures import causal_lm, completion_nll

transformers = pytest.importorskip("transformers")


class CharTokenizer:
    """Bytes as tokens (ids 3..258), BOS = 1, pad = 0: the call signature of an HF tokenizer."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [b + 3 for b in text.encode()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


def tiny_lm():
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=260, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(c).double().eval()


def nll_by_hand(model, ids: list[int], counted: list[bool]) -> list[float]:
    """−log p(token t | tokens < t) for every t ≥ 1 that counts, from one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits, -1)
    return [float(-logp[t - 1, ids[t]]) for t in range(1, len(ids)) if counted[t]]


def test_document_loss_sum_and_mean_by_hand():
    model, tok = tiny_lm(), CharTokenizer()
    texts = ["the cat sat", "a dog", "influence functions everywhere"]
    batch = lm.documents(tok, texts).collate([lm.documents(tok, texts)[i] for i in range(3)])
    assert batch["attention_mask"].sum(1).tolist() == [len(t) + 1 for t in texts]        # + BOS, right-padded
    with torch.no_grad():
        got_sum, got_mean = lm.lm_loss()(model, batch), lm.lm_loss("mean")(model, batch)
    for b, t in enumerate(texts):
        ids = tok(t)["input_ids"]
        want = nll_by_hand(model, ids, [True] * len(ids))
        assert abs(float(got_sum[b]) - sum(want)) < 1e-9 * max(1, sum(want))
        assert abs(float(got_mean[b]) - sum(want) / len(want)) < 1e-9 * max(1, sum(want))


def test_prompt_completion_masks_the_prompt_and_padding():
    model, tok = tiny_lm(), CharTokenizer()
    ps, cs = ["Q: capital of France? A:", "2+2="], [" Paris", " 4"]
    ds = lm.prompts(tok, ps, cs)
    batch = ds.collate([ds[0], ds[1]])
    for b, (p, c) in enumerate(zip(ps, cs)):
        n_p, n_c = len(tok(p)["input_ids"]), len(tok(c, add_special_tokens=False)["input_ids"])
        labels = batch["labels"][b]
        assert (labels[:n_p] == -100).all() and (labels[n_p:n_p + n_c] != -100).all() and (labels[n_p + n_c:] == -100).all()
        ids = tok(p)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"]
        want = sum(nll_by_hand(model, ids, [False] * n_p + [True] * n_c))
        with torch.no_grad():
            got = float(lm.completion_loss(model, batch)[b])
        assert abs(got - want) < 1e-9 * max(1.0, want)
    with pytest.raises(ConfigError, match="one completion per prompt"):
        lm.prompts(tok, ps, cs[:1])
    long = lm.prompts(tok, ["x" * 50], [" yes"], max_length=10)[0]
    assert len(long[0]) == 10 and long[1][-4:] == long[0][-4:]       # the prompt's start is cut, not the completion


def _attr(model):
    return Attributor(model, lm.lm_loss(), compressor=Dropout(r=8, seed=0), progress=False)


def test_misuse_is_a_dropinf_error_that_names_the_fix():
    model, tok = tiny_lm(), CharTokenizer()
    train = lm.documents(tok, ["the cat sat", "a dog", "on the mat"]).loader(2)
    query = lm.prompts(tok, ["the cat"], [" sat"]).loader(1)
    attr = _attr(model)
    attr.featurize(train)
    with pytest.raises(ConfigError, match=r"measure \*builder\*.*completion_loss"):
        attr.score(query, measure=completion_nll)                       # the builder, not called
    with pytest.raises(LossShapeError, match="token_scores"):
        attr.score(query, measure=lm.token_losses)                      # per-token measure in score()
    with pytest.raises(LossShapeError, match=r"lm_loss\(\)"):
        Attributor(model, causal_lm, compressor=Dropout(r=8), progress=False).featurize(train)
    assert issubclass(LossShapeError, DropinfError)
    scores = attr.score(query, measure=lm.completion_loss)
    assert scores.shape == (1, 3) and (scores != 0).all()
    tokens = attr.token_scores(query, lm.token_losses)
    assert tokens.shape[0] == 1 and abs(tokens.sum(1) - scores).max() < 1e-3 * abs(scores).max()


def test_a_query_with_no_scored_token_is_named():
    model, tok = tiny_lm(), CharTokenizer()
    attr = _attr(model)
    attr.featurize(lm.documents(tok, ["the cat sat", "a dog"]).loader(2))
    ds = lm.prompts(tok, ["the cat", "a"], [" sat", " b"])
    ds.rows[1] = (ds.rows[1][0], [-100] * len(ds.rows[1][0]))            # query 1: every label masked
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = attr.score(ds.loader(2), measure=lm.completion_loss)
    assert any("query ids [1]" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert (scores[1] == 0).all() and (scores[0] != 0).all()
