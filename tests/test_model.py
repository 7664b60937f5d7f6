"""Decoder: shapes, causality per attention kind, YaRN against hand-computed values."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from subq_jax.config import SSAConfig
from subq_jax.model import ModelConfig, Transformer, count_params, yarn_inv_freq, yarn_mscale

ATTN = SSAConfig(kind="ssa", block_size=4, top_k=1, fanout=2, beam=1, sink_blocks=1, local_blocks=1)
TINY = ModelConfig(
  vocab_size=258,
  num_layers=2,
  d_model=32,
  num_heads=4,
  num_kv_heads=2,
  mlp_dim=64,
  attention=ATTN,
  dtype="float32",
)


@pytest.fixture
def strict_ranks():
  # Only around the model's own ops: subq_jax/ssa.py broadcasts implicitly.
  with jax.numpy_rank_promotion("raise"):
    yield


@nnx.jit
def _apply(model, tokens):
  return model(tokens)


def _tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, 256)


def test_rope_and_norm_strict_ranks(strict_ranks):
  from subq_jax.model import RMSNorm, apply_rope

  x = jax.random.normal(jax.random.key(0), (2, 8, 3, 16))
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  y = apply_rope(x, pos, yarn_inv_freq(16, 1e4, 1.0, 0, 32.0, 1.0))
  chex.assert_shape(y, x.shape)
  # A rotation: norms of each (i, i + d/2) pair are kept.
  chex.assert_trees_all_close(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  chex.assert_shape(RMSNorm(16, 1e-6, jnp.float32)(x), x.shape)


@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_dtypes(tie):
  cfg = dataclasses.replace(TINY, tie_embeddings=tie, dtype="bfloat16")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  logits = _apply(model, _tokens(1, (2, 24)))
  chex.assert_shape(logits, (2, 24, cfg.vocab_size))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  params = nnx.state(model, nnx.Param)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert count_params(model) > 0
  assert hasattr(model, "unembed") != tie


@pytest.mark.parametrize(
  "kind,pattern,conv",
  [
    ("dense", (), 0),
    ("ssa", (), 0),
    ("sliding", (), 0),
    ("ssa", ("ssa", "dense"), 0),
    ("ssa", (), 4),
  ],
)
def test_causal(kind, pattern, conv):
  """Changing tokens after t leaves the logits at positions <= t unchanged."""
  cfg = dataclasses.replace(
    TINY,
    attention=dataclasses.replace(ATTN, kind=kind),
    attention_pattern=pattern,
    short_conv=conv,
  )
  model = Transformer(cfg, rngs=nnx.Rngs(2))
  seq, t = 40, 21
  a = _tokens(3, (2, seq))
  b = a.at[:, t + 1 :].set(_tokens(4, (2, seq - t - 1)))
  la, lb = _apply(model, a), _apply(model, b)
  chex.assert_trees_all_close(la[:, : t + 1], lb[:, : t + 1], atol=1e-5, rtol=1e-5)
  assert not np.allclose(la[:, t + 1 :], lb[:, t + 1 :], atol=1e-3)


def test_short_conv_mixes_earlier_tokens():
  """Width W: the attention input at t is x_t plus weighted x_{t-1} .. x_{t-W+1}."""
  cfg = dataclasses.replace(TINY, short_conv=3)
  attn = Transformer(cfg, rngs=nnx.Rngs(7)).blocks[0].attn
  x = jax.random.normal(jax.random.key(8), (2, 9, cfg.d_model))
  c = np.asarray(attn.conv[...])
  xs = np.asarray(x)
  want = xs + c[0] * xs
  want[:, 1:] += c[1] * xs[:, :-1]
  want[:, 2:] += c[2] * xs[:, :-2]
  chex.assert_trees_all_close(attn.short_conv(x), want, atol=1e-5, rtol=1e-5)
  # Zero history is the sequence start; a given history is read as the inputs before.
  hist = jax.random.normal(jax.random.key(9), (2, 2, cfg.d_model))
  full = attn.short_conv(jnp.concatenate([hist, x], axis=1))
  chex.assert_trees_all_close(attn.short_conv(x, hist), full[:, 2:], atol=1e-5, rtol=1e-5)


def test_attention_pattern_per_layer():
  cfg = dataclasses.replace(TINY, num_layers=4, attention_pattern=("ssa", "ssa", "ssa", "dense"))
  kinds = [cfg.layer_attention(i).kind for i in range(4)]
  assert kinds == ["ssa", "ssa", "ssa", "dense"]
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  _, infos = nnx.jit(lambda m, x: m(x, return_info=True))(model, _tokens(5, (1, 32)))
  assert len(infos) == 4


def test_remat_matches():
  x = _tokens(6, (2, 16))
  outs = []
  cfg = dataclasses.replace(TINY, attention=dataclasses.replace(ATTN, kind="dense"))
  for remat in ("none", "full", "dots"):
    model = Transformer(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(0))
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2)))(model)
    outs.append(nnx.state(grads))
  chex.assert_trees_all_close(outs[0], outs[1], atol=1e-6)
  chex.assert_trees_all_close(outs[0], outs[2], atol=1e-6)


def test_yarn_hand_computed():
  """head_dim 8, theta 1e4, s=4, L=64, ramp over [1, 32] rotations (YaRN eq. 17-18)."""
  # inv_freq = [1, 0.1, 0.01, 0.001]; rotations over L: r = 64 f / 2pi.
  # r0 = 10.18592 -> gamma0 = (r0 - 1) / 31 = 0.296320 -> 0.25 (1 - g) + g = 0.472240
  # r1 = 1.018592 -> gamma1 = 0.000600 -> 0.025 (1 - g) + 0.1 g = 0.025045
  # r2, r3 < 1 -> fully interpolated: 0.0025, 0.00025
  got = yarn_inv_freq(8, 1e4, 4.0, 64, beta_fast=32.0, beta_slow=1.0)
  np.testing.assert_allclose(got, [0.472240, 0.025045, 0.0025, 0.00025], rtol=1e-4)
  np.testing.assert_allclose(yarn_inv_freq(8, 1e4, 1.0, 64, 32.0, 1.0), [1, 0.1, 0.01, 0.001])
  assert yarn_mscale(1.0) == 1.0
  np.testing.assert_allclose(yarn_mscale(4.0), 0.1 * math.log(4.0) + 1)  # 1.138629


def test_yarn_changes_model_only_when_scaled():
  x = _tokens(7, (1, 32))
  base = Transformer(TINY, rngs=nnx.Rngs(0))
  scaled_cfg = dataclasses.replace(TINY, rope_scale=4.0, rope_original_length=16)
  scaled = nnx.merge(nnx.graphdef(Transformer(scaled_cfg, rngs=nnx.Rngs(0))), nnx.state(base))
  assert not np.allclose(_apply(base, x), _apply(scaled, x), atol=1e-4)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(num_heads=4, num_kv_heads=3), "multiple of"),
    (dict(d_model=30, num_heads=4), "not divisible"),
    (dict(attention_pattern=("ssa", "flash")), "attention_pattern"),
    (dict(remat="some"), "remat"),
    (dict(short_conv=-1), "short_conv"),
    (dict(rope_scale=2.0), "rope_original_length"),
  ],
)
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(TINY, **kwargs)


def test_far_scores_depend_on_the_key_offset_not_the_distance():
  """far_distance D: a far key at block offset o scores as the same key and query under
  true RoPE at distance D + B - 1 - o, wherever the two lie."""
  d_far, bs = 8, ATTN.block_size
  cfg = dataclasses.replace(TINY, attention=dataclasses.replace(ATTN, far_distance=d_far))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  attn = model.blocks[0].attn
  x = jax.random.normal(jax.random.key(1), (1, 64, cfg.d_model))
  # Query content at 40 and 9; key content (block offset 1) at 5 and 33, and at 30, the
  # true-RoPE position at distance D + B - 1 - 1 = 10 before the query at 40.
  x = x.at[:, 9].set(x[:, 40]).at[:, 33].set(x[:, 5]).at[:, 30].set(x[:, 5])
  inv_freq, _ = model.rope_tables()
  positions = jnp.arange(64)[None]
  q, k, _, kw = attn.project(x, positions, inv_freq)
  far = lambda p_q, p_k: float(jnp.dot(kw["far_q"][0, p_q, 0], kw["far_k"][0, p_k, 0]))
  true = float(jnp.dot(q[0, 40, 0], k[0, 40 - (d_far + bs - 2), 0]))
  for p_q, p_k in ((40, 5), (9, 33), (40, 33), (9, 5)):
    np.testing.assert_allclose(far(p_q, p_k), true, rtol=1e-5, atol=1e-5)
  # Under true RoPE the same pairs do depend on the distance.
  assert abs(float(jnp.dot(q[0, 40, 0], k[0, 5, 0])) - true) > 1e-3
