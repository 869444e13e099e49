"""Cached captures (train/captures.py): what is stored equals the model's own captures at the sampled positions, the
loss at sampled positions equals the numpy reference's per-position KL averaged there, and training on the cache
lowers the loss and resumes exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparda_jax import selection
from sparda_jax.config import ModelConfig, SparseConfig
from sparda_jax.errors import SpardaError
from sparda_jax.model import KVCache, Transformer
from test_train_loss import np_layer_reference
from train import loss as L
from train.captures import CaptureStore, row_key, sample_positions
from train.data import BatchStream
from train.forecast import ForecastTrainer, run_training

SPARSE = SparseConfig(top_k_blocks=4, local_blocks=1)
CONFIG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=8, max_context=1024)
SEQ, PER_ROW, START = 512, 48, 256


def _model():
    return Transformer(CONFIG, rngs=nnx.Rngs(0))


def _rows(n=4):
    return np.random.default_rng(0).integers(0, CONFIG.vocab_size, (n, SEQ)).astype(np.uint16)


def _settings(**overrides):
    return dict(dict(seq_len=SEQ, positions_per_row=PER_ROW, start=START, seed=3, block_size=64), **overrides)


def _store(tmp_path, model, rows, **overrides):
    store = CaptureStore(tmp_path / "captures", _settings(**overrides))
    return store, store.build(model, SPARSE, rows, progress=False)


def test_sample_positions():
    rows = _rows(2)
    pos = sample_positions(SEQ, PER_ROW, START, 3, row_key(rows[0]))
    assert len(set(pos.tolist())) == PER_ROW and pos.min() >= START and pos.max() < SEQ
    assert np.all(np.diff(pos) > 0)
    assert np.array_equal(pos, sample_positions(SEQ, PER_ROW, START, 3, row_key(rows[0].astype(np.int32))))
    assert not np.array_equal(pos, sample_positions(SEQ, PER_ROW, START, 3, row_key(rows[1])))  # another row
    with pytest.raises(SpardaError, match="cannot sample"):
        sample_positions(SEQ, SEQ, START, 3, row_key(rows[0]))


def test_store_holds_the_models_captures_at_the_sampled_positions(tmp_path):
    model, rows = _model(), _rows(3)
    store, keys = _store(tmp_path, model, rows)
    got = store.load([keys[2], keys[0]])
    cache = KVCache.create(CONFIG, SPARSE, 3, SEQ, jnp.float32)
    _, _, caps = model(jnp.asarray(rows.astype(np.int32)), cache, mode="dense", sparse=SPARSE, capture=True)
    for j, row in enumerate([2, 0]):
        pos = sample_positions(SEQ, PER_ROW, START, 3, keys[row])
        np.testing.assert_array_equal(got.positions[j], pos)
        for layer, c in enumerate(caps):
            tol = dict(rtol=2e-3, atol=2e-3)  # stored as float16
            np.testing.assert_allclose(got.attn_input[j, layer], np.asarray(c.attn_input[row, pos]), **tol)
            np.testing.assert_allclose(got.q[j, layer], np.asarray(c.q[row][:, :, pos]), **tol)
            np.testing.assert_allclose(got.kc[j, layer], np.asarray(selection.compress_keys(c.k[row], SPARSE)), **tol)
    assert got.num_blocks == SEQ // 64


def test_store_resumes_grows_refuses_other_settings_and_reports_corrupt_rows(tmp_path):
    model, rows = _model(), _rows(3)
    store, keys = _store(tmp_path, model, rows[:2])
    stamps = [store.path(k).stat().st_mtime_ns for k in keys]
    store.path(keys[1]).unlink()
    assert store.build(model, SPARSE, rows, progress=False) == [row_key(r) for r in rows]  # one missing, one new
    assert store.path(keys[0]).stat().st_mtime_ns == stamps[0] and store.path(keys[1]).exists()
    assert len(list(store.dir.glob("row-*.npz"))) == 3 and not list(store.dir.glob(".tmp-*"))
    with pytest.raises(SpardaError, match="other settings.*positions_per_row"):
        CaptureStore(store.dir, _settings(positions_per_row=8))
    store.path(keys[0]).write_bytes(b"not an npz")
    with pytest.raises(SpardaError, match="unreadable"):
        store.load([keys[0]])


@pytest.mark.parametrize("domain", ["paper", "nonforced"])
def test_loss_at_sampled_positions_is_the_reference_mean_there(domain):
    rng = np.random.default_rng(2)
    kv, g, t, d = 2, 2, 512, 8
    q = rng.normal(size=(kv, g, t, d)).astype(np.float32)
    k = rng.normal(size=(kv, t, d)).astype(np.float32)
    f = (q.mean(1) + rng.normal(size=(kv, t, d))).astype(np.float32)
    _, teacher_nf, _, kl = np_layer_reference(f, q, k, SPARSE, domain, per_position=True)
    pos = sample_positions(t, 40, 300, 0, "0" * 20)
    kc = selection.compress_keys(jnp.asarray(k)[None], SPARSE)
    positions = jnp.asarray(pos)[None]
    target = L.target_from_compressed(jnp.asarray(q[:, :, pos])[None], kc, positions, t // 64, SPARSE)
    got, weight = L.layer_loss(jnp.asarray(f[:, pos])[None], target, positions, SPARSE, domain)
    counted = teacher_nf[:, pos].any(-1)  # [KV, P]
    assert int(weight) == int(counted.sum()) > 0
    assert float(got) == pytest.approx(float(kl[:, pos][counted].mean()), rel=1e-3)


def _train(tmp_path, store, keys, steps, resume=False):
    trainer = ForecastTrainer(_model(), SPARSE)
    stream = BatchStream(np.arange(len(keys))[:, None], 2, 0)
    records = run_training(trainer, lambda i: store.load([keys[j] for j in stream.batch(i)[:, 0]]), steps=steps,
                           out=tmp_path / "run",
                           save_every=2, resume=resume, run_info={"model": "tiny"}, progress=False)
    return trainer, records


def test_training_on_captures_lowers_the_loss_and_resumes_exactly(tmp_path):
    store, keys = _store(tmp_path, _model(), _rows(4))
    _, records = _train(tmp_path / "a", store, keys, 12)
    first, last = np.mean([r["loss"] for r in records[:2]]), np.mean([r["loss"] for r in records[-2:]])
    assert last < 0.9 * first
    full, full_records = _train(tmp_path / "b", store, keys, 6)
    _train(tmp_path / "c", store, keys, 3)
    resumed, resumed_records = _train(tmp_path / "c", store, keys, 6, resume=True)
    for a, b in zip(full_records[3:], resumed_records):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    for a, b in zip(jax.tree.leaves(full.trainable), jax.tree.leaves(resumed.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
