"""A run stopped inside a chunk resumes from its last recorded batch (store.chunk): the batches
already written are not recomputed, and the finished store is byte-identical to one written in
one go — with a collate function that drops examples, after a torn tail, and after a resume
record that no longer matches its files (then the chunk starts afresh)."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data._utils.collate import default_collate

from dropinf import Attributor, Dropout
from dropinf.store import chunk as chunk_mod
from dropinf.store.featurizer import Featurizer
from dropinf.store.writer import StoreOptions
from tests.store import fixture


def _drop_label_zero(items):
    return default_collate([it for it in items if int(it[1]) != 0])


def _featurize(t, path, collate=None, stop_after=None, seen=None):
    """Featurize into one chunk of 200 rows; stop_after=j raises KeyboardInterrupt at batch j."""
    loader = torch.utils.data.DataLoader(t["train"], batch_size=16, collate_fn=collate)
    real, calls = Featurizer.rows, []

    def rows(self, capture, batch, ids, first=0, out=None):
        calls.append(ids.clone())
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return real(self, capture, batch, ids, first, out)
    mp = pytest.MonkeyPatch()
    mp.setattr(Featurizer, "rows", rows)
    try:
        attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=12, seed=2), progress=False)
        return attr.featurize(loader, store=StoreOptions(path, chunk_size=200))
    finally:
        mp.undo()
        if seen is not None:
            seen.extend(calls)


def _files(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def task(monkeypatch):
    monkeypatch.setattr(chunk_mod, "STATE_EVERY_S", 0.0)      # record every batch
    return fixture.build()


@pytest.mark.parametrize("collate", [None, _drop_label_zero], ids=["all-rows", "dropping-collate"])
def test_a_stopped_chunk_resumes_from_its_last_batch_byte_identical(task, tmp_path, collate):
    ref = _featurize(task, tmp_path / "ref", collate)
    with pytest.raises(KeyboardInterrupt):
        _featurize(task, tmp_path / "s", collate, stop_after=5)
    part = tmp_path / "s" / "chunks" / "000000.bin.partial"
    state = json.loads(part.with_name(part.name + ".json").read_text())
    assert state["next"] == 5 * 16 and not (tmp_path / "s" / "chunks" / "000000.json").exists()
    seen = []
    store = _featurize(task, tmp_path / "s", collate, seen=seen)
    assert int(torch.cat(seen).min()) >= 80          # the first five batches were not recomputed
    assert _files(tmp_path / "s") == _files(tmp_path / "ref")
    assert not list((tmp_path / "s" / "chunks").glob("*.partial*"))
    torch.testing.assert_close(store.ids(), ref.ids(), rtol=0, atol=0)


def test_a_torn_tail_is_cut_off_and_a_record_that_does_not_match_restarts_the_chunk(task, tmp_path):
    _featurize(task, tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        _featurize(task, tmp_path / "s", stop_after=4)
    part = tmp_path / "s" / "chunks" / "000000.bin.partial"
    with open(part, "ab") as f:                       # a batch half written when the process died
        f.write(b"\x00" * 37)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        _featurize(task, tmp_path / "s", stop_after=3, seen=seen)
    assert int(torch.cat(seen).min()) == 64           # resumed after the 4 recorded batches
    # a record claiming more rows than the file holds is not trusted: the chunk starts afresh
    rec = part.with_name(part.name + ".json")
    rec.write_text(json.dumps({"rows": 190, "next": 190}))
    seen = []
    _featurize(task, tmp_path / "s", seen=seen)
    assert int(torch.cat(seen).min()) == 0
    assert _files(tmp_path / "s") == _files(tmp_path / "ref")


def test_a_whole_chunk_written_at_once_must_hold_every_row(task, tmp_path):
    """write_chunk without ids is a whole chunk: a short block is refused, not taken for dropped rows."""
    from dropinf import StoreError
    store = _featurize(task, tmp_path / "s")
    before = _files(tmp_path / "s")
    with pytest.raises(StoreError, match="chunk 0 expects 200 rows, got 150"):
        store.write_chunk(0, torch.zeros(150, store.width))
    assert _files(tmp_path / "s") == before
