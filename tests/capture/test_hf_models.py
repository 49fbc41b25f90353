"""Fused capture on tiny random-init HF transformers (no download), with and without peft LoRA,
padded batches of unequal lengths, SDPA and eager attention: every captured entry equals the
same entry of a loop of single-example backward passes."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from dropinf import Dropout, Identity, LoGra  # noqa: E402
from dropinf.capture.engine import BatchCapture  # noqa: E402
from dropinf.capture.layers import select_layers  # noqa: E402
from tests.helpers import loop_grads  # noqa: E402

V = 40


def bert(impl):
    c = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=32, num_labels=3,
                                attn_implementation=impl)
    return transformers.BertForSequenceClassification(c)


def llama(impl):
    c = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                 tie_word_embeddings=True, attn_implementation=impl)
    return transformers.LlamaForCausalLM(c)


def gpt2(impl):
    c = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                bos_token_id=0, eos_token_id=0, attn_implementation=impl)
    return transformers.GPT2LMHeadModel(c)


def padded_batch(lengths, seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, V, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, L in enumerate(lengths):
        mask[i, :L] = 1
        ids[i, L:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.randint(0, labels, (len(lengths),), generator=g)
    return batch


def cls_loss(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return nn.functional.cross_entropy(out.logits, batch["labels"], reduction="none")


def lm_loss(model, batch):
    """Per-example summed next-token loss; padded positions are ignored (ignore_index)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    logits, labels = out.logits[:, :-1], labels[:, 1:]
    tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                      reduction="none", ignore_index=-100)
    return tok.reshape(labels.shape).sum(1)


LORA_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
BUILD = {"bert": (bert, cls_loss, 3), "llama": (llama, lm_loss, None), "gpt2": (gpt2, lm_loss, None)}


def check(model, loss_fn, batch, compressor, track=None, rtol=1e-4):
    layers = select_layers(model, track)
    comps = {l.name: compressor.build(l) for l in layers}
    feats, _ = BatchCapture(model, loss_fn, layers, comps)(batch)
    assert layers
    zero = [l.name for l in layers if not comps[l.name].from_flat(loop_grads(model, loss_fn, batch, l.param_names)).abs().max() > 0]
    assert len(zero) < len(layers), "the reference is all zeros: the comparison would be vacuous"
    check.zero_layers = zero
    for l in layers:
        ref = loop_grads(model, loss_fn, batch, l.param_names)
        want = comps[l.name].from_flat(ref)
        got = feats[l.name].double()
        scale = want.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(scale), msg=lambda m: f"{l.name}: {m}")
    return layers


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True])
def test_hf_fused_capture_matches_loop(arch, impl, lora):
    torch.manual_seed(0)
    build, loss_fn, labels = BUILD[arch]
    model = build(impl).double()
    if lora:
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS[arch], lora_dropout=0.1,
                              fan_in_fan_out=(arch == "gpt2"))
        model = peft.get_peft_model(model, cfg)
        for n, p in model.named_parameters():   # non-zero B so every LoRA gradient is non-trivial
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    model.eval()
    batch = padded_batch([5, 3, 7, 4], seed=1, labels=labels)
    track = "lora" if lora else "all"
    layers = check(model, loss_fn, batch, Dropout(r=50, seed=2), track=track)
    if lora:
        assert layers and all(("lora_A" in l.name or "lora_B" in l.name) for l in layers)
    else:
        kinds = {u.kind for l in layers for u in l.uses}
        assert "embedding" in kinds and ({"linear"} <= kinds)
        if arch == "gpt2":
            assert "conv1d" in kinds
    # Identity on the default selection (every Linear / Conv1D)
    check(model, loss_fn, batch, Identity(), track="lora" if lora else None)
    if impl == "sdpa":   # rotated dropout: the rotated inputs/output-grads inside the same hooks
        check(model, loss_fn, batch, Dropout(r=50, seed=2, rotate=True), track=track)


def test_tied_embedding_and_lm_head_add_up():
    torch.manual_seed(0)
    model = llama("sdpa").double().eval()
    layers = select_layers(model, "all")
    tied = [l for l in layers if len(l.uses) == 2]
    assert len(tied) == 1 and {u.kind for u in tied[0].uses} == {"embedding", "linear"}
    batch = padded_batch([6, 4, 6], seed=3)
    check(model, lm_loss, batch, Dropout(r=300, seed=0), track="all")
    check(model, lm_loss, batch, Dropout(r=300, seed=0, rotate=True), track="all")   # tied: rotated flat


def test_padding_tokens_contribute_nothing():
    """Appending padding to an example does not change its captured features."""
    torch.manual_seed(0)
    model = bert("sdpa").double().eval()
    layers = select_layers(model, "all")
    comps = {l.name: Dropout(r=40, seed=1).build(l) for l in layers}
    cap = BatchCapture(model, cls_loss, layers, comps)
    short = padded_batch([4, 6], seed=5, labels=3)
    long = {k: v for k, v in short.items()}
    long["input_ids"] = torch.cat([short["input_ids"], torch.zeros(2, 5, dtype=torch.long)], 1)
    long["attention_mask"] = torch.cat([short["attention_mask"], torch.zeros(2, 5, dtype=torch.long)], 1)
    a, _ = cap(short)
    b, _ = cap(long)
    for k in a:
        if "position_embeddings" in k:  # positions beyond the text receive no gradient either way
            continue
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                 tie_word_embeddings=False, attention_dropout=0.0)
    model = transformers.LlamaForCausalLM(c).double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()  # HF checkpoints only in training mode; this model has no dropout
    batch = padded_batch([5, 3, 6], seed=2)
    check(model, lm_loss, batch, Dropout(r=60, seed=1), track=None)
    # every layer inside the checkpointed blocks has a non-zero reference gradient (re-entrant
    # checkpointing once hid them from autograd.grad, giving all-zero features on both sides)
    assert check.zero_layers == []


def test_capture_leaves_model_untouched():
    torch.manual_seed(0)
    model = gpt2("sdpa").double().eval()
    batch = padded_batch([5, 3], seed=4)
    with torch.no_grad():
        before = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits.clone()
    layers = select_layers(model, "all")
    BatchCapture(model, lm_loss, layers, {l.name: Dropout(r=8).build(l) for l in layers})(batch)
    with torch.no_grad():
        after = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    assert torch.equal(before, after)
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_logra_on_conv1d_and_embedding_matches_dense():
    torch.manual_seed(0)
    model = gpt2("eager").double().eval()
    batch = padded_batch([5, 4, 3], seed=6)
    check(model, lm_loss, batch, LoGra(r_in=3, r_out=2, seed=0), track=["transformer.h.0.attn.c_attn",
                                                                         "transformer.wpe"])


def test_peft_seq_cls_with_head_in_modules_to_save_default_track():
    """peft's standard classifier: LoRA on q/v and a trainable head kept in modules_to_save (a
    ModulesToSaveWrapper exposing the head's weight). Default track captures LoRA's A/B and the
    head, each equal to the loop reference."""
    torch.manual_seed(0)
    model = bert("eager").double()
    cfg = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=["query", "value"],
                          lora_dropout=0.0)
    model = peft.get_peft_model(model, cfg).eval()
    names = [l.name for l in select_layers(model)]
    assert "base_model.model.classifier.modules_to_save.default" in names
    assert sum("lora_A" in n for n in names) == 4 and sum("lora_B" in n for n in names) == 4
    batch = padded_batch([5, 3, 6, 2], seed=4, labels=3)
    check(model, cls_loss, batch, Dropout(r=20, seed=3), track=None)


def test_output_layer_is_the_tracked_head():
    """The layer GaussNewton(head_damping=...) damps apart: the head kept in modules_to_save, the tied
    LM head (its block is the embedding's), none when only LoRA is tracked."""
    from dropinf.capture.layers import output_layer
    torch.manual_seed(0)
    cfg = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=["query", "value"])
    model = peft.get_peft_model(bert("eager"), cfg)
    assert output_layer(model, select_layers(model)) == "base_model.model.classifier.modules_to_save.default"
    assert output_layer(model, select_layers(model, "lora")) is None
    lm = llama("eager")                          # lm_head shares embed_tokens' weight
    specs = select_layers(lm, "all")
    assert output_layer(lm, specs) == "model.embed_tokens"
    assert "lm_head" in {u.module for s in specs if s.name == "model.embed_tokens" for u in s.uses}
