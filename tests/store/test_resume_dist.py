"""Kill-and-resume with SIGKILL, and torchrun with 2 processes (gloo, CPU), through the CLI."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY = "tests.store.fixture:build"


def files(folder: Path) -> dict:
    """Every file's bytes, except the saved preconditioner (its float sums depend on the order in
    which ranks add up; compared through the scores instead)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "precond" not in p.parts}


def run_cli(*args, env=None, **kw):
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dropinf", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=300, **kw)


def featurize_args(store):
    return ["featurize", ENTRY, "--store", str(store), "--chunk-size", "20", "--size", "12", "--no-progress"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    store = tmp_path_factory.mktemp("ref") / "store"
    res = run_cli(*featurize_args(store))
    assert res.returncode == 0, res.stderr
    return store


def test_sigkill_then_resume_is_byte_identical(tmp_path, reference):
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DROPINF_FIXTURE_SLEEP": "0.15"}
    proc = subprocess.Popen([sys.executable, "-m", "dropinf", *featurize_args(store)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = list((store / "chunks").glob("*.json")) if (store / "chunks").exists() else []
        if len(done) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in (store / "chunks").glob("*.json"))
    assert 3 <= len(done_before) < 12, done_before     # killed mid-run
    info = run_cli("info", str(store))
    assert '"complete": false' in info.stdout
    res = run_cli(*featurize_args(store))
    assert res.returncode == 0, res.stderr
    assert files(store) == files(reference)


def test_score_and_topk_cli(tmp_path, reference):
    out = tmp_path / "scores.npy"
    res = run_cli("score", ENTRY, "--store", str(reference), "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    scores = np.load(out)
    assert scores.shape == (20, 230) and np.isfinite(scores).all()
    res = run_cli("topk", ENTRY, "--store", str(reference), "-k", "3", "--no-progress")
    assert res.returncode == 0, res.stderr
    import json
    top = json.loads(res.stdout)
    np.testing.assert_array_equal(np.array(top["harmful_idx"]), np.argsort(-scores, 1, kind="stable")[:, :3])
    bad = run_cli("score", ENTRY, "--store", str(tmp_path / "nothing"), "--out", str(out))
    assert bad.returncode == 2 and "no store at" in bad.stderr and "Traceback" not in bad.stderr


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dropinf",
           *args]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res


def test_torchrun_two_processes_equal_one(tmp_path, reference):
    """Featurize, fit (statistics all-reduced) and score (train chunks split across ranks, then
    gathered) with 2 processes give what 1 process gives; a mask ensemble (--members) too."""
    store = tmp_path / "store"
    torchrun(*featurize_args(store))
    assert files(store) == files(reference)
    # no --estimator: the default (a four-member ensemble); then plain GaussNewton, DataInf, three members
    for est, extra in (("default", []), ("gauss-newton", []), ("datainf", []), ("gauss-newton", ["--members", "3"])):
        tag = est + "".join(extra)
        one, two = tmp_path / f"one-{tag}.npy", tmp_path / f"two-{tag}.npy"
        chosen = [] if est == "default" else ["--estimator", est]
        res = run_cli("score", ENTRY, "--store", str(reference), "--out", str(one), *chosen, *extra, "--no-progress")
        assert res.returncode == 0, res.stderr
        torchrun("score", ENTRY, "--store", str(store), "--out", str(two), *chosen, *extra, "--no-progress")
        a, b = np.load(one), np.load(two)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * np.abs(a).max())
    res = torchrun("topk", ENTRY, "--store", str(store), "-k", "4", "--no-progress")
    import json
    top = json.loads(res.stdout.strip().splitlines()[-1])
    a = np.load(tmp_path / "one-default.npy")
    assert not np.allclose(a, np.load(tmp_path / "one-gauss-newton.npy"))       # the default is not members=1
    np.testing.assert_array_equal(np.array(top["harmful_idx"]), np.argsort(-a, 1, kind="stable")[:, :4])
    np.testing.assert_array_equal(np.array(top["helpful_idx"]), np.argsort(a, 1, kind="stable")[:, :4])


def test_two_concurrent_featurize_processes_share_one_store(tmp_path, reference):
    """A re-run started while the first is still writing (two shells, a retried job): both finish
    without a traceback, each chunk has one writer, and the store is the one a single run makes."""
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DROPINF_FIXTURE_SLEEP": "0.05"}
    procs = [subprocess.Popen([sys.executable, "-m", "dropinf", *featurize_args(store)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert files(store) == files(reference)
    assert not list((store / "chunks").glob("*.lock")) and not list((store / "chunks").glob("*.tmp"))


def test_info_reports_a_damaged_store(tmp_path, reference):
    import json
    import shutil
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    ok = json.loads(run_cli("info", str(store)).stdout)
    assert ok["complete"] and ok["damaged"] == [] and ok["verified"]
    shard = store / "chunks" / "000003.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-8])                                   # truncated
    bad = json.loads(run_cli("info", str(store)).stdout)
    assert not bad["complete"] and bad["damaged"] == ["000003.bin"]
    shard.write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])   # one flipped bit
    bad = json.loads(run_cli("info", str(store)).stdout)
    assert not bad["complete"] and bad["damaged"] == ["000003.bin"]
