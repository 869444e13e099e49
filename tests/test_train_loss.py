"""The Forecast distillation loss and recall against references written here in numpy (SPARDA.md §2-4)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparda_jax.config import ModelConfig, SparseConfig
from sparda_jax.model import KVCache, Transformer
from train import loss as L

CFG = SparseConfig(block_size=64, compress_kernel=32, compress_stride=16, top_k_blocks=4, local_blocks=1)


# ------------------------------------------------------------------------------------------------ numpy references


def np_restricted_kl(p, logits, bins, visible, eps=1e-8):
    """KL over the bins plus one rest bin, each clamped to eps and renormalised; p and the student over visible keys."""
    out = np.zeros(p.shape[:-1])
    for idx in np.ndindex(*p.shape[:-1]):
        vis, b = visible[idx], bins[idx]
        z = logits[idx][vis]
        q = np.zeros(p.shape[-1])
        if vis.any():
            q[vis] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        pt = np.where(vis, p[idx], 0.0)
        tp = np.append(pt[b], pt[vis & ~b].sum())
        tq = np.append(q[b], q[vis & ~b].sum())
        tp, tq = np.maximum(tp, eps), np.maximum(tq, eps)
        tp, tq = tp / tp.sum(), tq / tq.sum()
        out[idx] = np.sum(tp * (np.log(tp) - np.log(tq)))
    return out


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_layer_reference(f, q, k, cfg, domain="paper", per_position=False, bins="selected"):
    """Loss (mean KL over counted (head, position) pairs) and non-forced teacher/student block sets, from scratch.

    f: [KV, T, D] selector output; q: [KV, G, T, D]; k: [KV, T, D]; one sequence, positions 0..T-1.
    Block 64 / kernel 32 / stride 16: Kc[c] = mean K[16c:16c+32]; key c visible at t iff 16c + 32 <= t;
    block j's score = max over keys 4j-1..4j+3; forced = block 0 and blocks >= qb - local; top-k by score.
    domain "paper": the KL runs over all visible keys; "nonforced": over the visible keys of the visible blocks
    that are not forced (both distributions renormalised there). bins "selected": the keys of the teacher's
    non-forced blocks have bins of their own, the rest of the domain shares one; "all": every domain key has its
    own. per_position: also return the KL [KV, T].
    """
    kv, g, t, d = q.shape
    n_keys = (t - 32) // 16 + 1
    nb = t // 64
    kc = np.stack([k[:, 16 * c: 16 * c + 32].mean(1) for c in range(n_keys)], axis=1)  # [KV, C, D]
    pos = np.arange(t)
    visible = 16 * np.arange(n_keys)[None, :] + 32 <= pos[:, None]  # [T, C]
    logits_q = np.einsum("kgtd,kcd->kgtc", q, kc) / np.sqrt(d)
    probs = np.zeros_like(logits_q)
    for t_ in range(t):
        if visible[t_].any():
            probs[:, :, t_, visible[t_]] = np_softmax(logits_q[:, :, t_, visible[t_]])
    teacher = probs.sum(1) / g  # [KV, T, C]
    student_logits = np.einsum("ktd,kcd->ktc", f, kc) / np.sqrt(d)
    raw_student = np.einsum("ktd,kcd->ktc", f, kc)

    def blocks_of(scores):  # [KV, T, C] (only visible entries meaningful) -> non-forced top-k sets
        chosen = np.zeros((kv, t, nb), bool)
        forced = np.zeros((t, nb), bool)
        for t_ in range(t):
            qb = t_ // 64
            for j in range(nb):
                forced[t_, j] = j <= qb and (j == 0 or j >= qb - cfg.local_blocks)
            for h in range(kv):
                score = np.full(nb, -np.inf)
                for j in range(qb + 1):
                    keys = [c for c in range(4 * j - 1, 4 * j + 4) if 0 <= c < n_keys and visible[t_, c]]
                    score[j] = max(scores[h, t_, c] for c in keys) if keys else np.finfo(np.float32).min
                ranked = np.where(forced[t_], np.inf, score)
                order = sorted(range(nb), key=lambda j: (-ranked[j], j))[: cfg.top_k_blocks]
                for j in order:
                    if ranked[j] > -np.inf:
                        chosen[h, t_, j] = True
        return chosen & ~forced[None], forced

    teacher_scores = np.where(visible[None], probs.sum(1), -np.inf)
    teacher_nf, _ = blocks_of(teacher_scores)
    student_nf, _ = blocks_of(np.where(visible[None], raw_student, -np.inf))
    key_bins = np.zeros((kv, t, n_keys), bool)
    for h in range(kv):
        for t_ in range(t):
            for j in np.flatnonzero(teacher_nf[h, t_]):
                for c in range(4 * j - 1, 4 * j + 4):
                    if 0 <= c < n_keys:
                        key_bins[h, t_, c] = True
    domain_keys = np.broadcast_to(visible[None], key_bins.shape).copy()
    if domain == "nonforced":
        for t_ in range(t):
            qb = t_ // 64
            candidates = [j for j in range(1, qb + 1) if j < qb - cfg.local_blocks]  # visible, not forced
            feeds = {c for j in candidates for c in range(4 * j - 1, 4 * j + 4)}
            domain_keys[:, t_] &= np.isin(np.arange(n_keys), sorted(feeds))
    kl = np_restricted_kl(teacher, student_logits, key_bins if bins == "selected" else domain_keys, domain_keys)
    counted = teacher_nf.any(-1)
    loss = kl[counted].mean() if counted.any() else 0.0
    return (loss, teacher_nf, student_nf, kl) if per_position else (loss, teacher_nf, student_nf)


# ------------------------------------------------------------------------------------------------ restricted KL


def _random_case(rng, shape=(3, 5), c=12):
    visible = np.ones((*shape, c), bool)
    visible[..., 9:] = False
    visible[0, 0, 4:] = False
    logits_t = rng.normal(size=(*shape, c)) * 2
    p = np.where(visible, np.exp(logits_t), 0.0)
    p = p / p.sum(-1, keepdims=True)
    bins = (rng.random((*shape, c)) < 0.4) & visible
    return p.astype(np.float32), visible, bins


def test_restricted_kl_matches_numpy_reference():
    rng = np.random.default_rng(0)
    p, visible, bins = _random_case(rng)
    logits = (rng.normal(size=p.shape) * 3).astype(np.float32)
    got = np.asarray(L.restricted_kl(jnp.asarray(p), jnp.asarray(logits), jnp.asarray(bins), jnp.asarray(visible)))
    want = np_restricted_kl(p.astype(np.float64), logits.astype(np.float64), bins, visible)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    assert (want > 1e-3).mean() > 0.5  # the case is not trivially zero


def test_restricted_kl_is_zero_when_student_equals_teacher():
    rng = np.random.default_rng(1)
    p, visible, bins = _random_case(rng)
    # softmax over the visible keys of log p is p itself.
    logits = np.where(visible, np.log(np.maximum(p, 1e-30)), 123.0).astype(np.float32)
    got = np.asarray(L.restricted_kl(jnp.asarray(p), jnp.asarray(logits), jnp.asarray(bins), jnp.asarray(visible)))
    np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_restricted_kl_clamps_empty_bins():
    # The teacher puts all its mass on bin 0; the student on bin 1. Clamping keeps the KL finite: log(1/1e-8)-ish.
    p = np.array([[1.0, 0.0, 0.0]], np.float32)
    logits = np.array([[-1e4, 0.0, -1e4]], np.float32)
    bins = np.array([[True, True, False]])
    visible = np.ones_like(bins)
    got = float(L.restricted_kl(jnp.asarray(p), jnp.asarray(logits), jnp.asarray(bins), jnp.asarray(visible))[0])
    want = float(np_restricted_kl(p.astype(np.float64), logits.astype(np.float64), bins, visible)[0])
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-4)
    assert got == pytest.approx(np.log(1 / 1e-8), rel=0.01)


# ------------------------------------------------------------------------------------------------ block sets


@pytest.mark.parametrize("query_block", [0, 1, 2, 3, 7])
def test_forced_blocks_are_the_sink_and_the_local_window(query_block):
    got = np.asarray(L.forced_block_mask(jnp.asarray([query_block]), 8, CFG))[0]
    want = [j <= query_block and (j == 0 or j >= query_block - CFG.local_blocks) for j in range(8)]
    assert got.tolist() == want


def test_keys_of_blocks_follow_the_max_pool_window():
    # SPARDA.md §2: block j pools keys 4j-1 .. 4j+3.
    inc = L.key_block_incidence(31, 8, CFG)
    for c in range(31):
        for j in range(8):
            assert inc[c, j] == (4 * j - 1 <= c <= 4 * j + 3), (c, j)


def test_blocks_to_mask_ignores_padding():
    got = np.asarray(L.blocks_to_mask(jnp.asarray([[3, 0, -1, -1]]), 5))
    assert got.tolist() == [[True, False, False, True, False]]


# ------------------------------------------------------------------------------------------------ one layer, end to end


@pytest.mark.parametrize("domain,bins", [("paper", "selected"), ("nonforced", "selected"), ("nonforced", "all")])
def test_layer_loss_and_recall_match_reference_built_from_scratch(domain, bins):
    rng = np.random.default_rng(2)
    kv, g, t, d = 2, 2, 512, 8
    q = rng.normal(size=(kv, g, t, d)).astype(np.float32)
    k = rng.normal(size=(kv, t, d)).astype(np.float32)
    f = (q.mean(1) + rng.normal(size=(kv, t, d))).astype(np.float32)
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    target = L.layer_target(jnp.asarray(q)[None], jnp.asarray(k)[None], positions, CFG)
    got, weight = L.layer_loss(jnp.asarray(f)[None], target, positions, CFG, domain, bins)
    predicted = L.selector_nonforced(jnp.asarray(f)[None], target, positions, CFG)

    want, teacher_nf, student_nf = np_layer_reference(f, q, k, CFG, domain, bins=bins)
    assert np.asarray(target.nonforced)[0].tolist() == teacher_nf.tolist()
    assert np.asarray(predicted)[0].tolist() == student_nf.tolist()
    assert int(weight) == int(teacher_nf.any(-1).sum())
    assert float(got) == pytest.approx(want, rel=1e-3)
    hits, total = L.recall_counts(predicted, target.nonforced, positions, 256)
    counted = np.arange(t) >= 256
    assert int(hits) == int((teacher_nf & student_nf)[:, counted].sum())
    assert int(total) == int(teacher_nf[:, counted].sum())


def _tiny_model(num_heads=2, num_kv_heads=2, layers=2):
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=layers, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, head_dim=16, max_context=1024)
    return Transformer(config, rngs=nnx.Rngs(0))


def _captures(model, tokens):
    cache = KVCache.create(model.config, CFG, *tokens.shape, jnp.float32)
    return model(tokens, cache, mode="dense", sparse=CFG, capture=True)[2]


def test_q_select_equal_to_the_queries_gives_zero_loss_and_full_recall():
    # One query head per group: the teacher is that head's softmax, and a q_select equal to q_proj reproduces it.
    model = _tiny_model(num_heads=2, num_kv_heads=2)
    attn = model.layers[0].attn
    attn.q_select.kernel.set_value(attn.q_proj.kernel[...])
    tokens = jax.random.randint(jax.random.key(0), (1, 512), 0, 50)
    loss, metrics = L.distillation_loss(model, _captures(model, tokens), CFG, min_position=256)
    assert float(metrics["loss"][0]) == pytest.approx(0.0, abs=1e-6)
    assert int(metrics["recall_hits"][0]) == int(metrics["recall_total"][0]) > 0
    assert float(metrics["loss"][1]) > 1e-4  # layer 1's Forecast is still random


def test_distillation_loss_is_the_mean_of_layer_losses_and_remat_changes_nothing():
    model = _tiny_model(num_heads=4, num_kv_heads=2, layers=3)
    tokens = jax.random.randint(jax.random.key(1), (2, 384), 0, 50)
    caps = _captures(model, tokens)
    loss, metrics = L.distillation_loss(model, caps, CFG)
    assert metrics["loss"].shape == (3,)
    assert float(loss) == pytest.approx(float(metrics["loss"].mean()), rel=1e-6)
    loss2, _ = L.distillation_loss(model, caps, CFG, remat=False)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    # Each term matches a direct per-layer computation (layer 2 is selected by layer 1's Forecast on h_1).
    positions = jnp.broadcast_to(jnp.arange(384), (2, 384))
    from sparda_jax.model import rope_frequencies

    attn = model.layers[1].attn
    f = attn.selector_query(attn.forecast, caps[1].attn_input, positions, rope_frequencies(model.config))
    direct, _ = L.layer_loss(f, L.layer_target(caps[2].q, caps[2].k, positions, CFG), positions, CFG)
    assert float(metrics["loss"][2]) == pytest.approx(float(direct), rel=1e-5)
