"""Forecast training on a tiny random model: only Forecast weights move, the loss falls, checkpoints resume exactly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparda_jax.config import ModelConfig, SparseConfig
from sparda_jax.errors import SpardaError
from sparda_jax.model import ForecastParam, Transformer
from train.data import BatchStream
from train.forecast import ForecastTrainer, OptimConfig, run_training

SPARSE = SparseConfig(top_k_blocks=4, local_blocks=1)
CONFIG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=8, max_context=1024)
SEQ = 384


def _model(dtype=jnp.float32):
    return Transformer(CONFIG, dtype=dtype, rngs=nnx.Rngs(0))


def _rows(n=6, seed=0):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (n, SEQ)).astype(np.uint16)


def _flat(state):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_only_forecast_parameters_change():
    model = _model()
    before_frozen = _flat(nnx.state(model, nnx.Not(ForecastParam)))
    before_forecast = _flat(nnx.state(model, ForecastParam))
    trainer = ForecastTrainer(model, SPARSE, OptimConfig(lr=1e-2))
    stream = BatchStream(_rows(), 2, seed=0)
    for i in range(3):
        trainer.train_step(stream.batch(i))
    trained = trainer.model()
    after_frozen = _flat(nnx.state(trained, nnx.Not(ForecastParam)))
    after_forecast = _flat(nnx.state(trained, ForecastParam))
    assert before_frozen.keys() == after_frozen.keys() and len(before_frozen) > 10
    for key, value in before_frozen.items():
        assert np.array_equal(value, after_frozen[key]), key  # bit-identical
    # Every Forecast projection that has a target moved (the last layer's Forecast forecasts nothing).
    moved = {k for k in before_forecast if not np.array_equal(before_forecast[k], after_forecast[k])}
    expected = {k for k in before_forecast if f"[{CONFIG.num_layers - 1}]" not in k}
    assert expected <= moved


def test_gradient_is_zero_outside_forecast_by_construction():
    # The loss as a function of *all* parameters: its gradient w.r.t. the frozen ones is exactly zero, because the
    # captured activations enter as constants.
    from sparda_jax.model import KVCache
    from train.loss import distillation_loss

    model = _model()
    tokens = jnp.asarray(_rows(2))
    cache = KVCache.create(CONFIG, SPARSE, 2, SEQ, jnp.float32)
    _, _, captures = model(tokens, cache, mode="dense", sparse=SPARSE, capture=True)
    graphdef, forecast, rest = nnx.split(model, ForecastParam, ...)

    def loss(forecast, rest):
        return distillation_loss(nnx.merge(graphdef, forecast, rest), captures, SPARSE)[0]

    grad_forecast, grad_rest = jax.grad(loss, argnums=(0, 1))(forecast, rest)
    frozen = _flat(grad_rest)
    assert len(frozen) > 10 and all(not np.any(v) for v in frozen.values())
    assert any(np.any(v) for v in _flat(grad_forecast).values())


def test_a_short_run_lowers_the_loss():
    trainer = ForecastTrainer(_model(), SPARSE, OptimConfig(lr=1e-2))
    batch = BatchStream(_rows(2), 2, seed=0).batch(0)
    losses = [trainer.train_step(batch)["loss"] for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_bfloat16_backbone_keeps_float32_forecast():
    trainer = ForecastTrainer(_model(jnp.bfloat16), SPARSE)
    record = trainer.train_step(BatchStream(_rows(2), 2, seed=0).batch(0))
    assert np.isfinite(record["loss"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.trainable))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(trainer.model(), nnx.Not(ForecastParam))))


def test_checkpoint_round_trip(tmp_path):
    from train.forecast import checkpoint_manager

    trainer = ForecastTrainer(_model(), SPARSE, OptimConfig(lr=1e-2))
    stream = BatchStream(_rows(), 2, seed=0)
    for i in range(2):
        trainer.train_step(stream.batch(i))
    manager = checkpoint_manager(tmp_path / "ck")
    trainer.save(manager, data_position=7)
    other = ForecastTrainer(_model(), SPARSE, OptimConfig(lr=1e-2))
    assert other.step == 0
    position = other.restore(manager, manager.latest_step())
    assert position == 7 and other.step == 2
    for a, b in zip(jax.tree.leaves(trainer.trainable), jax.tree.leaves(other.trainable)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(trainer.opt_state), jax.tree.leaves(other.opt_state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _run(out, steps, resume=False, save_every=2):
    trainer = ForecastTrainer(_model(), SPARSE, OptimConfig(lr=1e-2))
    stream = BatchStream(_rows(), 2, seed=3)
    info = {"model": "tiny", "data": "random", "seq_len": SEQ, "batch": 2, "lr": 1e-2}
    records = run_training(trainer, stream.batch, steps=steps, out=out, save_every=save_every, resume=resume,
                           run_info=info, progress=False)
    return trainer, records


def test_resume_equals_an_uninterrupted_run(tmp_path):
    full, full_records = _run(tmp_path / "full", steps=6)
    _run(tmp_path / "split", steps=3)  # stops at 3 (checkpoint at 2 and at the final step 3)
    resumed, resumed_records = _run(tmp_path / "split", steps=6, resume=True)
    assert [r["step"] for r in resumed_records] == [4, 5, 6]
    for a, b in zip(full_records[3:], resumed_records):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    for a, b in zip(jax.tree.leaves(full.trainable), jax.tree.leaves(resumed.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(full.opt_state), jax.tree.leaves(resumed.opt_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    # The log of the interrupted run, continued, reads like the uninterrupted one.
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_old_checkpoints(tmp_path):
    _run(tmp_path / "a", steps=2)
    with pytest.raises(SpardaError, match="already holds"):
        _run(tmp_path / "a", steps=4)
    trainer = ForecastTrainer(_model(), SPARSE)
    stream = BatchStream(_rows(), 2, seed=3)
    with pytest.raises(SpardaError, match="batch was 2, now 4"):
        run_training(trainer, stream.batch, steps=4, out=tmp_path / "a", save_every=2, resume=True,
                     run_info={"model": "tiny", "data": "random", "seq_len": SEQ, "batch": 4, "lr": 1e-2},
                     progress=False)
    with pytest.raises(SpardaError, match="no checkpoint"):
        run_training(trainer, stream.batch, steps=4, out=tmp_path / "empty", save_every=2, resume=True,
                     run_info={}, progress=False)


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    trainer = ForecastTrainer(_model(), SPARSE)
    stream = BatchStream(_rows(), 2, seed=3)
    records = run_training(trainer, stream.batch, steps=50, out=tmp_path, save_every=100, resume=False,
                           run_info={}, max_seconds=0.0, progress=False)
    assert len(records) == 1
    assert (tmp_path / "checkpoints" / "1").is_dir()


def test_micro_batches_give_the_full_batch_step():
    # The same 4 sequences as one forward and as 2 x 2: the loss is a mean over equally many counted positions per
    # sequence, so the averaged micro-batch gradients, the optimizer step and the metrics agree.
    rows = _rows(4)
    full, split = ForecastTrainer(_model(), SPARSE, OptimConfig(lr=1e-2)), \
        ForecastTrainer(_model(), SPARSE, OptimConfig(lr=1e-2), micro_batches=2)
    a, b = full.train_step(rows), split.train_step(rows)
    assert a["recall"] == b["recall"] and np.isclose(a["loss"], b["loss"], rtol=1e-5)
    assert np.isclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    fa, fb = _flat(nnx.state(full.model(), ForecastParam)), _flat(nnx.state(split.model(), ForecastParam))
    for key in fa:
        np.testing.assert_allclose(fa[key], fb[key], rtol=1e-4, atol=1e-6, err_msg=key)
    with pytest.raises(SpardaError, match="micro-batches"):
        split.train_step(rows[:3])
