"""KV-cache decoding (subq_jax.decode): every cached step equals the full forward there."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from subq_jax import decode
from subq_jax.config import SSAConfig
from subq_jax.model import ModelConfig, Transformer

# 4-token blocks, 2-query tiles (the routing window then spans the previous tile), a
# fanout of 2 so that a 40-token sequence has a 4-level tree.
ATTN = SSAConfig(
  kind="ssa", block_size=4, query_tile=2, top_k=2, fanout=2, beam=1, sink_blocks=1,
  local_blocks=1, indexer_heads=2, indexer_dim=8,
)  # fmt: skip
TINY = ModelConfig(
  num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, attention=ATTN,
  dtype="float32",
)  # fmt: skip
T = 40  # forward length
CACHE = 72  # cache buffer: 18 blocks, one tree level more than the forward's 10 blocks
LENGTHS = (5, 13)  # prompt lengths of the two rows
TOL = {"float32": 2e-4, "bfloat16": 5e-2}

# Every kind in one model (one compile per case keeps the file fast); the later layers'
# selections depend on the earlier layers' cached outputs.
ALL_KINDS = ("ssa", "block_topk", "sliding", "indexer", "dense")
CASES = {
  # A short convolution of width 7 reaches before the 5-token prompt's start.
  "every_kind_mean_summary_short_conv": dict(attention_pattern=ALL_KINDS, short_conv=7),
  # Bounds summaries, position-free routing keys, tiles of a whole block, RoPE scaled by
  # YaRN (as at evaluation beyond the training length).
  "bounds_position_free_routing_yarn": dict(
    attention_pattern=("ssa", "block_topk"),
    attention=dataclasses.replace(ATTN, summary="bounds", route_with_rope=False, query_tile=None),
    rope_scale=4.0,
    rope_original_length=16,
  ),
  "bfloat16": dict(attention_pattern=("ssa",), dtype="bfloat16"),
  # Far blocks at bounded distances (far_q, far_k cached and routed with).
  "far_blocks": dict(
    attention_pattern=("ssa", "block_topk", "sliding"),
    attention=dataclasses.replace(ATTN, far_distance=8),
  ),
}


def _model(model_cfg, seed=0):
  return Transformer(model_cfg, rngs=nnx.Rngs(seed))


def _check_decode_matches_forward(model_cfg, seed):
  model = _model(model_cfg, seed)
  graphdef, params = nnx.split(model)
  key_a, key_b = jax.random.split(jax.random.key(seed + 100))
  tokens = jax.random.randint(key_a, (2, T), 0, 256)
  # Stale cache entries: positions past a row's prompt hold other random tokens.
  junk = jax.random.randint(key_b, (2, CACHE), 0, 256)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  prompt = jnp.where(
    jnp.arange(CACHE)[None] < lengths[:, None], jnp.pad(tokens, ((0, 0), (0, CACHE - T))), junk
  )

  steps = T - max(LENGTHS)
  rows = np.arange(2)

  @jax.jit
  def run(params, tokens, prompt, lengths):  # one compile: forward, prefill, cached steps
    model = nnx.merge(graphdef, params)
    forward = model(tokens)
    logits, cache, fraction = decode.prefill(model, prompt, lengths)

    def one(cache, i):
      logits, cache = decode.step(model, cache, tokens[rows, lengths + i])
      return cache, logits

    cache, stepped = jax.lax.scan(one, cache, jnp.arange(steps))
    return forward, logits, fraction, stepped, cache["pos"]

  forward, logits, fraction, stepped, pos = run(params, tokens, prompt, lengths)
  tol = TOL[model_cfg.dtype]
  chex.assert_trees_all_close(logits, forward[rows, lengths - 1], atol=tol, rtol=tol)
  assert 0 < float(fraction) <= 1
  want = jnp.stack([forward[rows, lengths + i] for i in range(steps)])
  chex.assert_trees_all_close(stepped, want, atol=tol, rtol=tol)
  np.testing.assert_array_equal(pos, lengths + steps)


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_equals_forward(name):
  kw = CASES[name]
  cfg = dataclasses.replace(TINY, num_layers=len(kw["attention_pattern"]), **kw)
  _check_decode_matches_forward(cfg, seed=sorted(CASES).index(name))


def test_generate_is_greedy():
  """make_generate's tokens are the argmax chain of the full forward."""
  cfg = dataclasses.replace(TINY, attention=dataclasses.replace(ATTN, kind="sliding"))
  graphdef, params = nnx.split(_model(cfg, 3))
  lengths = np.array([6, 9], np.int32)
  prompt = np.asarray(jax.random.randint(jax.random.key(4), (2, 24), 0, 256), np.int32)
  new = 5
  gen, _, every = decode.make_generate(graphdef, new)(
    params, jnp.asarray(prompt), jnp.asarray(lengths)
  )
  apply = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  np.testing.assert_array_equal(every, np.argmax(apply(params, jnp.asarray(prompt)), axis=-1))
  seq = prompt.copy()  # causal: what follows a position never changes its logits
  for i in range(new):
    logits = apply(params, jnp.asarray(seq))
    seq[[0, 1], lengths + i] = np.argmax(logits[np.arange(2), lengths + i - 1], axis=-1)
  for r in range(2):
    np.testing.assert_array_equal(gen[r], seq[r, lengths[r] : lengths[r] + new])


def test_cache_length_must_hold_whole_blocks():
  graphdef, params = nnx.split(_model(TINY))
  with pytest.raises(ValueError, match="multiple of 4"):
    decode.prefill(nnx.merge(graphdef, params), jnp.zeros((1, 10), jnp.int32), jnp.array([3]))
