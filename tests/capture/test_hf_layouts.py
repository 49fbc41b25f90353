"""Small random-config HF models whose layouts broke capture before the per-example check: Swin-v2
(a position-bias MLP on a (1, ...) coordinate table, reshaped with .view), T5 (an Embedding on
(q, k) relative-position buckets with no batch dimension, q == B and q != B), and two audio models
(Wav2Vec2: Conv1d feature extractor, weight-norm-parametrized positional conv; Whisper). Every
tracked layer's rows equal the loop of single-example backward passes, default track and "all"."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from tests.capture.test_layouts import TRACKS, assert_rows  # noqa: E402


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def swin():
    c = transformers.Swinv2Config(image_size=16, patch_size=4, num_channels=3, embed_dim=8, depths=[1, 1],
                                  num_heads=[1, 2], window_size=2, num_labels=3, mlp_ratio=1.0)
    return transformers.Swinv2ForImageClassification(c)


def swin_loss(m, b):
    x, y = b
    return nn.functional.cross_entropy(m(pixel_values=x).logits, y, reduction="none")


def t5():
    c = transformers.T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
                              num_heads=2, relative_attention_num_buckets=4, relative_attention_max_distance=8,
                              decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(c)


def t5_loss(m, b):
    ids, lab = b
    out = m(input_ids=ids, labels=lab)
    return nn.functional.cross_entropy(out.logits.transpose(1, 2), lab, reduction="none").sum(1)


def wav2vec2():
    c = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                    conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8),
                                    num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, num_labels=3,
                                    vocab_size=10)
    return transformers.Wav2Vec2ForSequenceClassification(c)


def whisper():
    c = transformers.WhisperConfig(vocab_size=20, num_mel_bins=4, encoder_layers=1, decoder_layers=1,
                                   encoder_attention_heads=2, decoder_attention_heads=2, d_model=8,
                                   encoder_ffn_dim=16, decoder_ffn_dim=16, max_source_positions=6,
                                   max_target_positions=8, pad_token_id=0, decoder_start_token_id=1, num_labels=3)
    return transformers.WhisperForAudioClassification(c)


def audio_loss(key):
    def loss(m, b):
        x, y = b
        return nn.functional.cross_entropy(m(**{key: x}).logits, y, reduction="none")
    return loss


@pytest.mark.parametrize("track", TRACKS)
def test_swinv2_position_bias_mlp_goes_to_torch_func(track):
    torch.manual_seed(0)
    g = _gen()
    batch = (torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
    _, msgs = assert_rows(swin().double(), batch, track, swin_loss)
    routed = [m for m in msgs if "continuous_position_bias_mlp" in m and "torch.func" in m]
    assert routed and all("shared by the whole batch" in m for m in routed), msgs


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize("T", [3, 5], ids=["q==B", "q!=B"])
def test_t5_relative_position_bias(T, track):
    torch.manual_seed(0)
    g = _gen()
    batch = (torch.randint(1, 20, (3, T), generator=g), torch.randint(1, 20, (3, T - 1), generator=g))
    _, msgs = assert_rows(t5().double(), batch, track, t5_loss)
    if track == "all":
        assert any("relative_attention_bias" in m and "torch.func" in m for m in msgs), msgs


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize("name", ["wav2vec2", "whisper"])
def test_audio_models(name, track):
    torch.manual_seed(0)
    g = _gen()
    model = (wav2vec2 if name == "wav2vec2" else whisper)().double()
    x = (torch.randn(3, 400, generator=g, dtype=torch.float64) if name == "wav2vec2"
         else torch.randn(3, 4, 12, generator=g, dtype=torch.float64))
    batch = (x, torch.randint(0, 3, (3,), generator=g))
    attr, _ = assert_rows(model, batch, track, audio_loss("input_values" if name == "wav2vec2" else "input_features"))
    if name == "wav2vec2" and track == "all":   # the weight-norm-parametrized positional conv is tracked
        assert any("parametrizations.weight.original" in n for l in attr.layers for n in l.param_names)
