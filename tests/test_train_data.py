"""Training data: sources parsed from hand-made files, held-out split by document, packing, deterministic batches."""

import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from sparda_jax.errors import SpardaError
from train import data as D


# ------------------------------------------------------------------------------------------------ an R serializer


def _r_int(v):
    return struct.pack(">i", v)


def _r_charsxp(s):
    if s is None:
        return _r_int(9) + _r_int(-1)
    raw = s.encode()
    return _r_int(9 | (1 << 15)) + _r_int(len(raw)) + raw  # 1<<15: UTF-8 flag in the levels bits


def _r_strsxp(values):
    return _r_int(16) + _r_int(len(values)) + b"".join(_r_charsxp(v) for v in values)


def _r_intsxp(values):
    return _r_int(13) + _r_int(len(values)) + b"".join(_r_int(v) for v in values)


def _r_named_list(items):
    """VECSXP with a names attribute: flags carry the attribute bit; the pairlist holds tag 'names'."""
    body = _r_int(19 | (1 << 9)) + _r_int(len(items)) + b"".join(v for _, v in items)
    names_attr = (_r_int(2 | (1 << 10)) + _r_int(1) + _r_charsxp("names") + _r_strsxp([k for k, _ in items])
                  + _r_int(254))
    return body + names_attr


def _r_serialize(obj_bytes, version=3):
    head = b"X\n" + _r_int(version) + _r_int(0x040201) + _r_int(0x030500)
    if version == 3:
        head += _r_int(5) + b"UTF-8"
    return head + obj_bytes


def make_janeaustenr(folder, books):
    """A lazy-load database like R writes: Rdata.rdx (gzip of an index) and Rdata.rdb (length + zlib chunks)."""
    data = folder / "janeaustenr" / "data"
    data.mkdir(parents=True)
    blob, index = b"", []
    for name, lines in books.items():
        payload = _r_serialize(_r_strsxp(lines), version=2)
        chunk = struct.pack(">I", len(payload)) + zlib.compress(payload)
        index.append((name, _r_intsxp([len(blob), len(chunk)])))
        blob += chunk
    rdx = _r_named_list([("variables", _r_named_list(index)), ("references", _r_named_list([])),
                         ("compressed", _r_int(10) + _r_int(1) + _r_int(1))])
    (data / "Rdata.rdx").write_bytes(gzip.compress(_r_serialize(rdx)))
    (data / "Rdata.rdb").write_bytes(blob)
    return folder / "janeaustenr"


def test_r_unserialize_reads_named_lists_of_strings():
    raw = _r_serialize(_r_named_list([("a", _r_strsxp(["x", "y"])), ("b", _r_strsxp(["z", None]))]))
    assert D.r_unserialize(raw) == {"a": ["x", "y"], "b": ["z", None]}
    with pytest.raises(ValueError):
        D.r_unserialize(b"RDX2\n")


def test_austen_documents_from_a_lazy_load_database(tmp_path):
    folder = make_janeaustenr(tmp_path, {"emma": ["EMMA", "", "Chapter 1", "Emma Woodhouse, handsome"],
                                         "persuasion": ["Persuasion", None, "Sir Walter Elliot"]})
    docs = D.austen_documents(folder)
    assert [d.name for d in docs] == ["austen/emma", "austen/persuasion"]
    assert docs[0].text == "EMMA\n\nChapter 1\nEmma Woodhouse, handsome"
    assert docs[1].text == "Persuasion\n\nSir Walter Elliot"
    (folder / "data" / "Rdata.rdb").write_bytes(b"garbage")
    with pytest.raises(SpardaError, match="cannot read the janeaustenr data"):
        D.austen_documents(folder)


def test_named_sources_read_the_package_json(tmp_path, monkeypatch):
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    essays = "January 2015Essay one. It ends.March 2009(An aside) Essay two.May 2004\"Quoted\" three."
    (json_dir / "PaulGrahamEssays.json").write_text(json.dumps({"text": "Intro text." + essays}))
    (json_dir / "hotpotqa.json").write_text(json.dumps([
        {"_id": "q1", "context": [["Alpha", ["A one.", " A two."]], ["Beta", ["B."]]]},
        {"_id": "q2", "context": [["Beta", ["B."]], ["Gamma", ["G."]]]},
        {"_id": "q3", "context": [["Alpha", ["A one."]]]},
    ]))
    (json_dir / "squad.json").write_text(json.dumps({"data": [
        {"title": "Black_Death", "paragraphs": [{"context": "P1."}, {"context": "P2."}]}]}))
    monkeypatch.setenv("SPARDA_LCE_DIR", str(tmp_path / "json"))
    pg = D.load_documents("pg")
    assert [d.text[:12] for d in pg] == ["Intro text.", "January 2015", "March 2009(A", "May 2004\"Quo"]
    hotpot = D.load_documents("hotpotqa")
    # Paragraphs appear once overall; a question whose paragraphs were all seen yields no document.
    assert [(d.name, d.text) for d in hotpot] == [("hotpotqa/q1", "Alpha\nA one. A two.\n\nBeta\nB."),
                                                  ("hotpotqa/q2", "Gamma\nG.")]
    assert D.load_documents("squad")[0].text == "Black Death\n\nP1.\n\nP2."


def test_missing_sources_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARDA_LCE_DIR", str(tmp_path))
    with pytest.raises(SpardaError, match="unknown data source"):
        D.load_documents("nonsense")
    with pytest.raises(SpardaError, match="fraction"):
        D.parse_spec("pg:2")
    with pytest.raises(SpardaError, match="fraction"):
        D.parse_spec("pg:x")
    empty = tmp_path / "empty.txt"
    empty.write_text("   ")
    with pytest.raises(SpardaError, match="holds no text"):
        D.load_documents(str(empty))


def _docs(n, source="s"):
    return [D.Document(f"{source}/{i:03d}", f"document {i} " * 20) for i in range(n)]


def test_split_is_by_document_deterministic_and_keeps_both_sides_of_each_source():
    docs = _docs(40, "a") + _docs(3, "b") + _docs(1, "c")
    train, heldout = D.split_documents(docs, 0.1, seed=0)
    assert {d.name for d in train}.isdisjoint({d.name for d in heldout})
    assert len(train) + len(heldout) == len(docs)
    for source in ("a", "b"):
        assert any(d.source == source for d in heldout) and any(d.source == source for d in train)
    assert [d.source for d in heldout].count("c") == 0  # a lone document stays in training
    again = D.split_documents(list(reversed(docs)), 0.1, seed=0)[1]
    assert {d.name for d in again} == {d.name for d in heldout}
    assert {d.name for d in D.split_documents(docs, 0.1, seed=1)[1]} != {d.name for d in heldout}


def test_pack_joins_documents_with_eos_and_drops_the_tail():
    docs = [D.Document("s/a", "abc"), D.Document("s/b", "de")]
    rows = D.pack(docs, lambda text: [ord(ch) - 90 for ch in text], seq_len=3, eos_id=0, vocab_size=100)
    assert rows.dtype == np.uint16
    assert rows.tolist() == [[7, 8, 9], [0, 10, 11]]  # stream 7 8 9 0 10 11 0: the last 0 is dropped
    assert D.pack(docs, lambda t: [1], 3, 0, vocab_size=70000).dtype == np.uint32


class _CharTokenizer:
    vocab_size = 300
    eos_ids = (1,)

    def encode(self, text):
        return [2 + (ord(ch) % 250) for ch in text]


def test_prepare_caches_and_thins_only_training_documents(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text(f"text number {i}. " * 30)
    spec = str(folder)
    first = D.prepare(spec, _CharTokenizer(), 64, heldout_fraction=0.2, cache_dir=tmp_path / "cache")
    assert first.train.shape[1] == 64 and len(first.heldout) > 0
    assert set(first.train_docs).isdisjoint(first.heldout_docs)
    cached = D.prepare(spec, _CharTokenizer(), 64, heldout_fraction=0.2, cache_dir=tmp_path / "cache")
    assert np.array_equal(cached.train, first.train) and cached.heldout_docs == first.heldout_docs
    assert len(list((tmp_path / "cache").iterdir())) == 1
    thin = D.prepare(spec + ":0.5", _CharTokenizer(), 64, heldout_fraction=0.2, cache_dir=None)
    assert thin.heldout_docs == first.heldout_docs
    assert set(thin.train_docs) < set(first.train_docs) and len(thin.train_docs) < 0.8 * len(first.train_docs)


def test_batch_stream_is_a_pure_function_of_the_index():
    rows = np.arange(10 * 4).reshape(10, 4).astype(np.uint16)
    a, b = D.BatchStream(rows, 3, seed=5), D.BatchStream(rows, 3, seed=5)
    assert a.per_epoch == 3
    for i in (0, 1, 2, 3, 7):
        assert np.array_equal(a.batch(i), b.batch(i))
        assert a.batch(i).dtype == np.int32
    epoch = np.concatenate([a.batch(i) for i in range(3)])
    assert len({tuple(r) for r in epoch.tolist()}) == 9  # no row twice within an epoch
    assert not np.array_equal(a.batch(0), a.batch(3))  # the next epoch is reshuffled
    with pytest.raises(SpardaError, match="fewer than the batch size"):
        D.BatchStream(rows[:2], 3, seed=0)


def test_load_token_rows_recuts(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(10, dtype=np.uint16).reshape(2, 5))
    assert D.load_token_rows(tmp_path / "t.npy", 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(SpardaError):
        D.load_token_rows(tmp_path / "missing.npy", 4)
