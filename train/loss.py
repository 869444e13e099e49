"""Forecast distillation loss and recall (SPARDA.md §4), composed from `sparda_jax.selection`.

The selection math (compressed keys, selector scores, block pooling, forced blocks, top-k) is only *called* here.
What this module adds is training-specific: which compressed keys the loss looks at, the KL with a "rest" bin, and
recall@k of one block selection against another.

Shapes: B batch, KV kv heads, G query heads per group, T tokens, C compressed keys, NB blocks, D head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparda_jax import selection
from sparda_jax.config import SparseConfig
from sparda_jax.model import LayerCapture, Transformer, rope_frequencies

CLAMP = 1e-8
_LOG_CLAMP = float(np.log(CLAMP))


# ------------------------------------------------------------------------------------------------ block sets


def blocks_to_mask(ids: jax.Array, num_blocks: int) -> jax.Array:
    """[..., k] block ids (-1 = none) -> [..., NB] bool membership."""
    slots = jnp.where(ids >= 0, ids, num_blocks)  # -1 goes to a spare column that is cut off
    mask = jnp.zeros((*ids.shape[:-1], num_blocks + 1), jnp.bool_)
    mask = jnp.put_along_axis(mask, slots, True, axis=-1, inplace=False)
    return mask[..., :num_blocks]


def forced_block_mask(query_block: jax.Array, num_blocks: int, cfg: SparseConfig) -> jax.Array:
    """[...] query blocks -> [..., NB] bool: the sink and local blocks `select_blocks` always keeps.

    Asked of `select_blocks` itself: with every score -inf and k = local_blocks + 2 (the number of forced blocks once
    the sequence is long enough) it returns exactly the forced blocks.
    """
    only_forced = dataclasses.replace(cfg, top_k_blocks=cfg.local_blocks + 2)
    scores = jnp.full((*query_block.shape, num_blocks), -jnp.inf, jnp.float32)
    return blocks_to_mask(selection.select_blocks(scores, query_block, only_forced), num_blocks)


def selected_nonforced(scores: jax.Array, positions: jax.Array, forced: jax.Array, cfg: SparseConfig) -> jax.Array:
    """Compressed-key scores [B, KV, T, C] -> [B, KV, T, NB] bool: the blocks decoding selects per token, minus
    the forced ones."""
    num_blocks = forced.shape[-1]
    ids = selection.select_for_queries(scores, positions, num_blocks, cfg, per_query_block=False)
    return blocks_to_mask(ids, num_blocks) & ~forced


@functools.lru_cache(maxsize=32)
def key_block_incidence(num_keys: int, num_blocks: int, cfg: SparseConfig) -> np.ndarray:
    """[C, NB] float32, 1 where compressed key c is pooled into block j's score by `selection.block_scores`.

    Computed by pooling one-hot score vectors, so it always matches the pooling that ranks the blocks.
    """
    eye = np.where(np.eye(num_keys, dtype=bool), 0.0, -np.inf).astype(np.float32)
    with jax.ensure_compile_time_eval():  # a constant, also when first asked for inside a trace
        pooled = np.asarray(selection.block_scores(jnp.asarray(eye), num_blocks, cfg))
    return (pooled > -np.inf).astype(np.float32)


def keys_of_blocks(block_mask: jax.Array, num_keys: int, cfg: SparseConfig) -> jax.Array:
    """[..., NB] bool -> [..., C] bool: compressed keys that feed the score of any block in the mask."""
    incidence = jnp.asarray(key_block_incidence(num_keys, block_mask.shape[-1], cfg))
    hits = jnp.einsum("...n,cn->...c", block_mask.astype(jnp.float32), incidence,
                      precision=jax.lax.Precision.HIGHEST)
    return hits > 0.5


# ------------------------------------------------------------------------------------------------ KL with a rest bin


def restricted_kl(teacher: jax.Array, student_logits: jax.Array, bins: jax.Array, visible: jax.Array) -> jax.Array:
    """KL(teacher || student) over the compressed keys in `bins` plus one "rest" bin holding all other visible mass.

    teacher: [..., C] probabilities (a distribution over the visible keys); student_logits: [..., C] logits whose
    softmax over the visible keys is the student; bins, visible: [..., C] bool. Every bin (the rest bin included) is
    clamped to >= 1e-8 on both sides and each side renormalised, as SPARDA.md §4 specifies. Returns [...].
    """
    neg = jnp.finfo(jnp.float32).min
    logits = jnp.where(visible, student_logits.astype(jnp.float32), neg)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    log_q = logits - lse
    rest_logits = jnp.where(visible & ~bins, logits, -jnp.inf)
    log_q_rest = jax.nn.logsumexp(rest_logits, axis=-1) - lse[..., 0]  # -inf when nothing is left over

    p = jnp.where(visible, teacher.astype(jnp.float32), 0.0)
    p_in = jnp.where(bins, p, 0.0)
    p_rest = jnp.clip(p.sum(-1) - p_in.sum(-1), 0.0, None)

    # Clamp every bin, then renormalise (in log space for the student).
    p_bins = jnp.where(bins, jnp.maximum(p_in, CLAMP), 0.0)
    p_rest = jnp.maximum(p_rest, CLAMP)
    z_p = p_bins.sum(-1) + p_rest
    log_q_bins = jnp.maximum(log_q, _LOG_CLAMP)
    log_q_rest = jnp.maximum(log_q_rest, _LOG_CLAMP)
    log_z_q = jnp.logaddexp(jax.nn.logsumexp(jnp.where(bins, log_q_bins, -jnp.inf), axis=-1), log_q_rest)

    pn_bins = p_bins / z_p[..., None]
    pn_rest = p_rest / z_p
    kl_bins = jnp.where(bins, pn_bins * (jnp.log(jnp.where(bins, pn_bins, 1.0)) - (log_q_bins - log_z_q[..., None])),
                        0.0).sum(-1)
    kl_rest = pn_rest * (jnp.log(pn_rest) - (log_q_rest - log_z_q))
    return kl_bins + kl_rest


# ------------------------------------------------------------------------------------------------ one layer


@dataclasses.dataclass(frozen=True)
class LayerTarget:
    """The teacher side of one layer, computed from the frozen backbone: no gradient flows into it."""

    teacher: jax.Array  # [B, KV, T, C] group-mean query-selector distribution (0 where invisible)
    scores: jax.Array  # [B, KV, T, C] query-selector scores (-inf where invisible), for block selection
    kc: jax.Array  # [B, KV, C, D] compressed keys
    nonforced: jax.Array  # [B, KV, T, NB] bool: the teacher's selected non-forced blocks
    forced: jax.Array  # [B, 1, T, NB] bool
    visible: jax.Array  # [B, KV, T, C] bool: compressed keys complete before the token


def layer_target(q: jax.Array, k: jax.Array, positions: jax.Array, cfg: SparseConfig) -> LayerTarget:
    """The target of one layer from its queries q [B, KV, G, T, D] and keys k [B, KV, Tk, D] (post-RoPE)."""
    return target_from_compressed(q, selection.compress_keys(k, cfg), positions, k.shape[-2] // cfg.block_size, cfg)


def target_from_compressed(q: jax.Array, kc: jax.Array, positions: jax.Array, num_blocks: int,
                           cfg: SparseConfig) -> LayerTarget:
    """As `layer_target`, from the compressed keys kc [B, KV, C, D]; positions [B, T] may be any query positions
    (the cached captures of `train.captures` hold a sample of them)."""
    scores = selection.query_selector_scores(q, kc, positions, cfg)
    group = q.shape[2]
    teacher = jnp.where(jnp.isfinite(scores), scores / group, 0.0)
    query_block = (positions // cfg.block_size)[:, None, :]
    forced = forced_block_mask(query_block, num_blocks, cfg)
    nonforced = selected_nonforced(scores, positions, forced, cfg)
    return LayerTarget(teacher, scores, kc, nonforced, forced, jnp.isfinite(scores))


# Which compressed keys the KL runs over: "nonforced" (default) drops the keys that only feed forced blocks,
# "paper" keeps every visible key, as SPARDA.md §4 reads.
LOSS_DOMAINS = ("nonforced", "paper")
# Which keys of the domain are bins of their own: those of the teacher's selected blocks, the rest pooled into one
# bin (SPARDA.md §4; default), or all of them (a plain KL over the domain).
LOSS_BINS = ("selected", "all")


def layer_loss(f: jax.Array, target: LayerTarget, positions: jax.Array, cfg: SparseConfig,
               domain: str = "nonforced", bins: str = "selected") -> tuple[jax.Array, jax.Array]:
    """Distillation loss of one selector output f [B, KV, T, D] against its layer's target.

    domain (LOSS_DOMAINS): the forced sink and local blocks are attended whatever the selector scores, yet they
    hold much of the teacher's mass (the local window above all). With domain "paper" that mass sits in the rest
    bin, where the student may match it by putting mass anywhere, including on a key it then ranks above a
    selected block. "nonforced" takes the forced blocks' keys out of the distribution (teacher and student are
    renormalised over the keys of visible non-forced blocks), so the rest bin holds exactly the non-forced mass the
    teacher did not select. On SmolLM2 this raised held-out recall@16 where the paper's domain had stopped
    (README, §The shipped SmolLM2-135M Forecast).

    Returns (loss, weight): the mean KL over (KV head, position) pairs whose teacher selected at least one non-forced
    block, and the number of such pairs (positions before that have nothing to learn).
    """
    if domain not in LOSS_DOMAINS:
        raise ValueError(f"unknown loss domain {domain!r} (choose from {', '.join(LOSS_DOMAINS)})")
    if bins not in LOSS_BINS:
        raise ValueError(f"unknown loss bins {bins!r} (choose from {', '.join(LOSS_BINS)})")
    num_keys = target.kc.shape[-2]
    logits = selection.forecast_scores(f, target.kc, positions, cfg) * f.shape[-1] ** -0.5
    visible = target.visible
    if domain == "nonforced":
        num_blocks = target.forced.shape[-1]
        query_block = (positions // cfg.block_size)[:, None, :, None]
        candidates = (jnp.arange(num_blocks) <= query_block) & ~target.forced
        visible = visible & keys_of_blocks(candidates, num_keys, cfg)
    key_bins = keys_of_blocks(target.nonforced, num_keys, cfg) if bins == "selected" else visible
    kl = restricted_kl(target.teacher, logits, key_bins, visible)
    counted = target.nonforced.any(-1)
    weight = counted.sum()
    return jnp.where(counted, kl, 0.0).sum() / jnp.maximum(weight, 1), weight


def recall_counts(predicted_nonforced: jax.Array, target_nonforced: jax.Array, positions: jax.Array,
                  min_position: int) -> tuple[jax.Array, jax.Array]:
    """(hits, total): how many of the target's non-forced blocks the prediction also picked, at positions >=
    min_position, summed over batch, heads and positions. recall@k = hits / total."""
    counted = (positions >= min_position)[:, None, :, None]
    hits = (predicted_nonforced & target_nonforced & counted).sum()
    total = (target_nonforced & counted).sum()
    return hits, total


def selector_nonforced(f: jax.Array, target: LayerTarget, positions: jax.Array, cfg: SparseConfig) -> jax.Array:
    """The non-forced blocks a Forecast-style selector output f [B, KV, T, D] picks for the target layer."""
    scores = selection.forecast_scores(f, target.kc, positions, cfg)
    return selected_nonforced(scores, positions, target.forced, cfg)


def default_min_position(cfg: SparseConfig) -> int:
    """From here on top-k is a real choice: before it, all visible non-forced blocks fit into k (recall 1 trivially)."""
    return cfg.top_k_blocks * cfg.block_size


# ------------------------------------------------------------------------------------------------ whole model


def selector_outputs(model: Transformer, attn_inputs: Sequence[jax.Array], positions: jax.Array) -> list[jax.Array]:
    """What selects layer l's blocks in SparDA, for every layer l: layer 0's q_select on h_0, then the Forecast of
    layer l-1 on h_{l-1}. attn_inputs[l] = h_l [B, T, hidden]; each output is [B, KV, T, D]."""
    inv_freq = rope_frequencies(model.config)
    outs = []
    for target in range(len(attn_inputs)):
        if target == 0:
            attn, h = model.layers[0].attn, attn_inputs[0]
            outs.append(attn.selector_query(attn.q_select, h, positions, inv_freq))
        else:
            attn, h = model.layers[target - 1].attn, attn_inputs[target - 1]
            outs.append(attn.selector_query(attn.forecast, h, positions, inv_freq))
    return outs


def distillation_loss(model: Transformer, captures: Sequence[LayerCapture], cfg: SparseConfig, *,
                      min_position: int | None = None, remat: bool = True, domain: str = "nonforced",
                      bins: str = "selected"):
    """Mean over layers of `layer_loss`, every layer's target from the (frozen, already computed) captures of full
    sequences. See `sampled_distillation_loss` for the arguments and the result."""
    b, t = captures[0].attn_input.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return sampled_distillation_loss(model, [c.attn_input for c in captures], [c.q for c in captures],
                                     [selection.compress_keys(c.k, cfg) for c in captures], positions,
                                     t // cfg.block_size, cfg, min_position=min_position, remat=remat, domain=domain,
                                     bins=bins)


def sampled_distillation_loss(model: Transformer, attn_inputs: Sequence[jax.Array], queries: Sequence[jax.Array],
                              compressed_keys: Sequence[jax.Array], positions: jax.Array, num_blocks: int,
                              cfg: SparseConfig, *, min_position: int | None = None, remat: bool = True,
                              domain: str = "nonforced", bins: str = "selected"):
    """Mean over layers of `layer_loss` at query `positions` [B, T] (all of a sequence, or a sample of it).

    Per layer l: attn_inputs[l] = h_l [B, T, hidden] and queries[l] [B, KV, G, T, D] at those positions,
    compressed_keys[l] [B, KV, C, D] of the whole sequence of num_blocks blocks. Only the Forecast projections (and
    layer 0's q_select) enter through `model`; the rest are constants, so the gradient reaches nothing else.
    Returns (loss, metrics) with per-layer arrays `loss` [L], `recall_hits` [L], `recall_total` [L] (recall against
    the teacher's top-k at positions >= min_position).
    """
    stop = jax.lax.stop_gradient
    attn_inputs = [stop(h) for h in attn_inputs]
    min_position = default_min_position(cfg) if min_position is None else min_position

    def one_layer(f, q, kc):
        target = target_from_compressed(stop(q), stop(kc), positions, num_blocks, cfg)
        loss, _ = layer_loss(f, target, positions, cfg, domain, bins)
        predicted = selector_nonforced(stop(f), target, positions, cfg)
        hits, total = recall_counts(predicted, target.nonforced, positions, min_position)
        return loss, (hits, total)

    step = jax.checkpoint(one_layer) if remat else one_layer
    losses, hits, totals = [], [], []
    for f, q, kc in zip(selector_outputs(model, attn_inputs, positions), queries, compressed_keys):
        loss, (h, tot) = step(f, q, kc)
        losses.append(loss)
        hits.append(h)
        totals.append(tot)
    losses = jnp.stack(losses)
    metrics = {"loss": losses, "recall_hits": jnp.stack(hits), "recall_total": jnp.stack(totals)}
    return losses.mean(), metrics
