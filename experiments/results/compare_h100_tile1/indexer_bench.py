"""Device micro-benchmark: the indexer kind's forward+backward at the ablation's training
shape ([16, 4096] tokens, 8 query heads on 2 KV heads of 32, 4 index heads of 32, 448 keys):
the library's ssa._indexer (session 9: the forward gathers each query's selected keys;
the backward works on them and writes the key and value terms into the dense layout)
against session 9's first backward (masked dense) and copies of the masked dense body of
session 8: attention matmuls in the input dtype or float32 'highest', selection by
lax.top_k + scatter or by a bit threshold, chunk size. Prints ms per step and the max
gradient deviation from the library. Run from the repository root:
python <this file> [batch] [length] [fwd]; `fwd` times the forward only (results:
README.md and indexer_bench_s9.txt here)."""

import functools
import sys
import time

import jax
import jax.numpy as jnp

from subq_jax import ssa
from subq_jax.config import SSAConfig


def top_k_mask(x: jax.Array, k: int) -> jax.Array:
  """The positions of `lax.top_k(x, k)` along the last axis as a bool mask (ties to the
  lower index, as top_k), without sorting: the k-th largest value is found bit by bit
  (32 counting passes over float32 keys ordered as unsigned integers), then the values
  above it and the first equal ones up to k are taken. A sort of each row, which top_k
  of k = 448 out of thousands becomes, is the slower part of the indexer's selection."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31).astype(bool)  # flip negatives wholly, positives' sign bit
  u = jnp.where(negative, ~bits, bits | jnp.uint32(1 << 31))

  def bit(i, kth):  # the largest kth with at least k values >= it, one bit at a time
    candidate = kth | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    enough = jnp.sum(u >= candidate[..., None], axis=-1) >= k
    return jnp.where(enough, candidate, kth)

  kth = jax.lax.fori_loop(0, 32, bit, jnp.zeros(x.shape[:-1], jnp.uint32))[..., None]
  above = u > kth
  room = k - jnp.sum(above, axis=-1, keepdims=True)
  tied = u == kth
  return above | (tied & (jnp.cumsum(tied, axis=-1) <= room))


def variant(native, threshold, chunk_scale):
  def _indexer(q, k, v, config, index_q, index_k, weights, scale):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    budget = min(config.keys_per_query, t)
    f32 = jnp.float32
    index_q, index_k, weights = (x.astype(f32) for x in (index_q, index_k, weights))
    kk, vv = (k, v) if native else (k.astype(f32), v.astype(f32))
    rows = max(config.indexer_heads, hq)
    per_chunk = max(1, min(t, chunk_scale * ssa.CHUNK_ELEMENTS // max(1, b * t * rows)))
    pad = -t % per_chunk
    qpos = jnp.arange(t + pad).reshape(-1, per_chunk)

    def padq(x):
      x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
      return jnp.moveaxis(x.reshape(b, -1, per_chunk, *x.shape[2:]), 1, 0)

    def chunk(args):
      pos, q_c, iq_c, w_c = args
      c = pos.shape[0]
      logits_i = jnp.einsum("bchd,bsd->bchs", iq_c, index_k[:, :, 0], precision="highest")
      score = jnp.einsum("bchs,bch->bcs", jax.nn.relu(logits_i), w_c, precision="highest")
      causal = jnp.arange(t)[None, None, :] <= pos[None, :, None]
      masked = jnp.where(causal, jax.lax.stop_gradient(score), -jnp.inf)
      if threshold:
        chosen = top_k_mask(masked, budget) & causal
      else:
        _, idx = jax.lax.top_k(masked, budget)
        rows_b, rows_c = jnp.arange(b)[:, None, None], jnp.arange(c)[None, :, None]
        chosen = jnp.zeros((b, c, t), bool).at[rows_b, rows_c, idx].set(True) & causal
      q_g = (q_c if native else q_c.astype(f32)).reshape(b, c, hkv, g, d)
      logits = (
        jnp.einsum("bckgd,bskd->bckgs", q_g, kk, precision="highest", preferred_element_type=f32)
        * scale
      )
      probs = jax.nn.softmax(jnp.where(chosen[:, :, None, None], logits, -jnp.inf), axis=-1)
      out = jnp.einsum(
        "bckgs,bskd->bckgd",
        probs.astype(vv.dtype),
        vv,
        precision="highest",
        preferred_element_type=f32,
      )
      target = jax.lax.stop_gradient(probs.sum(axis=(2, 3)) / hq)
      kl = ssa._kl(target, score, chosen)
      return out.reshape(b, c, hq, d), jnp.where(pos < t, kl, 0.0)

    out, kl = jax.lax.map(jax.checkpoint(chunk), (qpos, padq(q), padq(index_q), padq(weights)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, t + pad, hq, d)[:, :t].astype(q.dtype)
    keys = jnp.minimum(jnp.arange(t) + 1, budget).astype(jnp.float32)
    loss = jnp.moveaxis(kl, 0, 1).reshape(b, -1).sum(-1) / t
    return out, ssa.AttentionInfo(None, jnp.broadcast_to(keys.sum(), (b, hkv)), loss)

  return _indexer


b = int(sys.argv[1]) if len(sys.argv) > 1 else 16
t = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
cfg = SSAConfig(
  kind="indexer",
  block_size=64,
  top_k=4,
  sink_blocks=1,
  local_blocks=1,
  indexer_heads=4,
  indexer_dim=32,
)
ks = jax.random.split(jax.random.PRNGKey(0), 7)
bf = jnp.bfloat16
q = jax.random.normal(ks[0], (b, t, 8, 32), bf)
k = jax.random.normal(ks[1], (b, t, 2, 32), bf)
v = jax.random.normal(ks[2], (b, t, 2, 32), bf)
iq = jax.random.normal(ks[3], (b, t, 4, 32), bf)
ik = jax.random.normal(ks[4], (b, t, 1, 32), bf)
w = jax.random.normal(ks[5], (b, t, 4), bf)
dout = jax.random.normal(ks[6], (b, t, 8, 32), jnp.float32)


def loss(q, k, v, iq, ik, w):
  out, info = ssa.ssa_attention(
    q, k, v, cfg, routing_q=iq, routing_k=ik, indexer_weights=w, return_info=True
  )
  return jnp.sum(out.astype(jnp.float32) * dout) + info.indexer_loss.sum()


def _masked_dense(q_c, k, v, idx, valid, scale):
  """Session 9's first backward (a copy): the gathered attention's output recomputed over
  all T keys with the unselected ones masked, and differentiated by autodiff."""
  b, c, hq, d = q_c.shape
  hkv = k.shape[2]
  rows_b, rows_c = jnp.arange(b)[:, None, None], jnp.arange(c)[None, :, None]
  chosen = jnp.zeros((b, c, k.shape[1]), bool).at[rows_b, rows_c, idx].set(valid)
  mm = functools.partial(jnp.einsum, precision="highest", preferred_element_type=jnp.float32)
  logits = mm("bckgd,bskd->bckgs", q_c.reshape(b, c, hkv, hq // hkv, d), k)
  probs = jax.nn.softmax(jnp.where(chosen[:, :, None, None], logits * scale, -jnp.inf), axis=-1)
  return mm("bckgs,bskd->bckgd", probs.astype(v.dtype), v).reshape(b, c, hq, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def masked_dense_backward(q_c, k, v, idx, valid, scale):
  return ssa._attend_gathered(q_c, k, v, idx, valid, scale)


def _mdb_fwd(q_c, k, v, idx, valid, scale):
  return ssa._attend_gathered(q_c, k, v, idx, valid, scale), (q_c, k, v, idx, valid)


def _mdb_bwd(scale, residuals, cotangents):
  q_c, k, v, idx, valid = residuals
  _, vjp = jax.vjp(lambda q_c, k, v: _masked_dense(q_c, k, v, idx, valid, scale), q_c, k, v)
  return (*vjp(cotangents[0].astype(jnp.float32)), None, None)


masked_dense_backward.defvjp(_mdb_fwd, _mdb_bwd)

orig, orig_attend = ssa._indexer, ssa._attend_selected
base = None
print(jax.__version__, jax.devices()[0].device_kind, "b", b, "t", t, flush=True)
# The library: gathered forward, backward on the selected keys spread into the dense layout
# (session 9). "gathered fwd, masked dense bwd": session 9's first version (111.8 ms);
# "masked dense chunk x4": session 8's library (130 ms); the rest older variants.
FWD_VARIANTS = (
  ("library (gathered forward)", orig, orig_attend),
  ("masked dense chunk x4", variant(True, False, 4), orig_attend),
  ("masked dense+threshold x16", variant(True, True, 16), orig_attend),
)
fwd_only = len(sys.argv) > 3 and sys.argv[3] == "fwd"
for name, fn, attend in (
  FWD_VARIANTS
  if fwd_only
  else (
    ("library", orig, orig_attend),
    ("gathered fwd, masked dense bwd", orig, masked_dense_backward),
    ("masked dense chunk x4", variant(True, False, 4), orig_attend),
  )
):
  ssa._attend_selected = attend
  ssa._indexer = fn
  f = (
    jax.jit(lambda *a: loss(*a))
    if fwd_only
    else jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
  )
  try:
    r = f(q, k, v, iq, ik, w)
    jax.block_until_ready(r)
  except Exception as e:
    print(name, "FAILED", type(e).__name__, str(e)[:200], flush=True)
    continue
  t0 = time.perf_counter()
  for _ in range(5):
    r = f(q, k, v, iq, ik, w)
  jax.block_until_ready(r)
  ms = (time.perf_counter() - t0) / 5 * 1e3
  if fwd_only:
    print(f"{name:28s} forward only {ms:8.1f} ms  loss {float(r):.5g}", flush=True)
    continue
  if base is None:
    base = r
  dev = max(
    float(
      jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32)))
      / (float(jnp.max(jnp.abs(c.astype(jnp.float32)))) + 1e-9)
    )
    for a, c in zip(r[1], base[1], strict=True)
  )
  print(
    f"{name:28s} {ms:8.1f} ms/step  {b * t / ms * 1e3:9.0f} tok/s (one layer)  "
    f"loss {float(r[0]):.4g} (base {float(base[0]):.4g})  max rel grad dev {dev:.3g}",
    flush=True,
  )
ssa._indexer, ssa._attend_selected = orig, orig_attend
