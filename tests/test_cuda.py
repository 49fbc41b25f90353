"""On a CUDA GPU (skipped without one; `bash run.sh gpu-check` runs this file): fused capture
row by row against the loop in float32 and under bfloat16 autocast, the capture-only backward and
rows written into the caller's buffers bit for bit, scorer and store equal to the CPU, and torchrun with nccl on one GPU."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def _ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def _autocast_ce(model, batch):
    x, y = batch
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    return nn.functional.cross_entropy(out.float(), y, reduction="none")


@pytest.mark.parametrize("track", [None, "all"])
def test_fused_rows_match_the_loop_on_cuda(track):
    from tests.capture.test_layouts import SeqFirstEncoder, assert_rows, tokens
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 3)).cuda()
    x, y = torch.randn(6, 8, device="cuda"), torch.randint(0, 3, (6,), device="cuda")
    assert_rows(mlp, (x, y), track)
    ids, lab = tokens(4, 6)
    assert_rows(SeqFirstEncoder().cuda(), (ids.cuda(), lab.cuda()), track)
    assert_rows(mlp, (x, y), track, _autocast_ce, rtol=3e-2)


def test_every_conv_path_on_cuda(monkeypatch):
    """The CNN whose convolutions take the library-gradient and the entry-by-entry paths by cost
    (tests/capture/test_modules.py), row by row against the loop on the GPU, in float32 and under
    bfloat16 autocast, with no layer sent to the torch.func path."""
    from dropinf import Dropout
    from dropinf.capture import modules
    from tests.capture.test_layouts import assert_rows
    from tests.capture.test_modules import WideCNN
    used = []
    orig = modules.Use._conv_entries
    monkeypatch.setattr(modules.Use, "_conv_entries", lambda *a: (used.append(1), orig(*a))[1])
    torch.manual_seed(0)
    model = WideCNN().cuda()
    batch = (torch.randn(5, 3, 16, 16, device="cuda"), torch.tensor([0, 1, 2, 3, 1], device="cuda"))
    for loss, rtol in ((_ce, 1e-3), (_autocast_ce, 3e-2)):
        _, seen = assert_rows(model, batch, "all", loss, rtol=rtol, compressor=Dropout(r=96, seed=4))
        assert not [w for w in seen if "torch.func" in w], seen
    assert used


def test_capture_only_backward_is_bit_identical_on_cuda():
    from dropinf_experiments.models.vision import ResNet18
    from tests.capture.test_lean_backward import assert_lean_equals_full
    torch.manual_seed(0)
    model = ResNet18().cuda()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g).cuda(), torch.randint(0, 5, (4,), generator=g).cuda())
               for _ in range(3)]
    assert_lean_equals_full(model, _ce, batches, [nn.Conv2d, nn.Linear])


def test_rows_written_into_buffers_on_cuda_are_bit_identical():
    from dropinf_experiments.models.vision import ResNet18
    from tests.capture.test_row_buffers import assert_buffers_equal_plain
    torch.manual_seed(0)
    model = ResNet18().cuda().eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g).cuda(), torch.randint(0, 5, (4,), generator=g).cuda())
               for _ in range(3)]
    assert_buffers_equal_plain(model, _ce, batches, [nn.Conv2d, nn.Linear])


def test_scorer_and_store_on_cuda_equal_the_cpu(tmp_path):
    from dropinf import Attributor, Dropout, ScoreOptions
    from tests.store import fixture
    t = fixture.build()
    dl = lambda ds: torch.utils.data.DataLoader(ds, batch_size=16)
    cpu = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=12, seed=1), progress=False)
    cpu.featurize(dl(t["train"]))
    want = cpu.score(dl(t["query"]))
    gpu = Attributor(t["model"].cuda(), t["loss_fn"], compressor=Dropout(r=12, seed=1), progress=False)
    gpu.featurize(dl(t["train"]), store=tmp_path / "s")
    got = gpu.score(dl(t["query"]), options=ScoreOptions(device="cuda"))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    top = gpu.topk(dl(t["query"]), k=3)
    np.testing.assert_array_equal(top.harmful_idx[:, 0], want.argmax(1))


def test_torchrun_with_nccl_on_one_gpu(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DROPINF_FIXTURE_DEVICE": "cuda"}
    entry = "tests.store.fixture:build"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "dropinf"]
    for args in (["featurize", entry, "--store", str(tmp_path / "s"), "--size", "12", "--no-progress"],
                 ["score", entry, "--store", str(tmp_path / "s"), "--out", str(tmp_path / "g.npy"), "--no-progress"]):
        res = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    env["DROPINF_FIXTURE_DEVICE"] = "cpu"
    for args in (["featurize", entry, "--store", str(tmp_path / "c"), "--size", "12", "--no-progress"],
                 ["score", entry, "--store", str(tmp_path / "c"), "--out", str(tmp_path / "c.npy"), "--no-progress"]):
        res = subprocess.run([sys.executable, "-m", "dropinf"] + args, cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    a, b = np.load(tmp_path / "c.npy"), np.load(tmp_path / "g.npy")
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * np.abs(a).max())


def test_gaussian_hash_generator_makes_the_cpu_projection_on_the_gpu():
    from dropinf import Gaussian
    from dropinf.capture.layers import LayerSpec
    layer = Gaussian(r=64, seed=3, block=500, generator="hash").build(LayerSpec("x", "func", ("x.w",), ((1200,),)))
    for j in range(3):
        cpu = layer.block_matrix(j, torch.device("cpu"), torch.float32)
        gpu = layer.block_matrix(j, torch.device("cuda"), torch.float32)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-7)
