"""Layer-spec parsing (the authors' syntax) and the split proposed from representation dynamics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from loopus_jax import LoopusError
from loopus_jax.config import ModelConfig
from loopus_jax.loop.analyze import measure_dynamics, plot_dynamics, propose_split
from loopus_jax.loop.spec import parse_layer_spec, split_layers
from loopus_jax.models.transformer import Transformer


@pytest.mark.parametrize(
    "raw,want",
    [
        ("0,1,2", (0, 1, 2)),
        ("2", (0, 1, 2)),
        ("0", (0,)),
        ("3-7", (3, 4, 5, 6, 7)),
        ("3..7", (3, 4, 5, 6, 7)),
        ("13-", (13, 14, 15)),
        ("13..", (13, 14, 15)),
        ("none", ()),
        ("empty", ()),
        ("[]", ()),
        (" 5 - 6 ".replace(" ", ""), (5, 6)),
    ],
)
def test_every_spec_form(raw, want):
    assert parse_layer_spec(raw, 16) == want


@pytest.mark.parametrize(
    "raw,text",
    [
        ("16", "out of range"),
        ("3-20", "out of range"),
        ("7-3", "ends before it starts"),
        ("a,b", "bad layer spec"),
        ("1,1", "repeated"),
        ("16-", "past the last layer"),
        ("x..", "bad layer spec"),
    ],
)
def test_bad_specs_name_the_layer_count(raw, text):
    with pytest.raises(LoopusError, match=text) as e:
        parse_layer_spec(raw, 16)
    assert "16 layers" in str(e.value)


def test_split_blocks():
    s = split_layers("1", "27..27", 28)
    assert s.encoder == (0, 1) and s.decoder == (27,) and s.reasoning == tuple(range(2, 27))
    assert split_layers("none", "none", 4).reasoning == (0, 1, 2, 3)
    assert split_layers(*s.flags().replace("--encoder ", "").split(" --decoder "), 28) == s


@pytest.mark.parametrize(
    "enc,dec,text",
    [
        ("0-3", "3-", "overlap at layer"),
        ("0-4", "5-", "no layers are left"),
        ("2-3", "7-", "contiguous prefix"),
        ("0,2", "7-", "contiguous prefix"),
        ("1", "5-6", "contiguous suffix"),
        ("1", "5,7", "contiguous suffix"),
    ],
)
def test_bad_splits_name_the_layer_count(enc, dec, text):
    with pytest.raises(LoopusError, match=text) as e:
        split_layers(enc, dec, 8)
    assert "8 layers" in str(e.value)


def test_planted_dynamics_dictate_the_split():
    # Three big early transitions, a flat middle with noise, a two-layer readout stage.
    rng = np.random.RandomState(0)
    update = 0.3 + 0.02 * rng.rand(24)
    update[:3] = [9.0, 2.0, 1.0]
    update[-2:] = [0.8, 1.5]
    s = propose_split(update)
    assert s.encoder == (0, 1, 2) and s.decoder == (22, 23)
    # A flat network still gets one layer on each side; a long "big" run is capped at L/4.
    assert propose_split(np.full(12, 0.5)).encoder == (0,)
    big = np.full(12, 0.3)
    big[:5] = 5.0  # five big leading layers, median still 0.3
    assert propose_split(big).encoder == (0, 1, 2)


def test_measured_dynamics_match_numpy(tmp_path):
    """The jitted per-layer metrics equal a NumPy computation from the layer-by-layer states."""
    cfg = ModelConfig("llama", 50, 16, 32, 4, 2, 1, 8)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    ids = list(np.random.RandomState(1).randint(0, 50, 13))
    dyn = measure_dynamics(model, ids, window=8)  # windows of 8 and 5 tokens
    import jax.numpy as jnp

    from loopus_jax.models import layers as L

    ups, coss, lasts = [], [], []
    for w in (ids[:8], ids[8:]):
        arr = jnp.asarray([w])
        ctx = L.make_context(cfg, jnp.ones_like(arr))
        hs = [np.asarray(model.embed_tokens(arr))[0]]
        arrs = model.layers.arrays()
        for i in range(cfg.num_layers):
            hs.append(np.asarray(L.decoder_layer({k: v[i] for k, v in arrs.items()}, jnp.asarray(hs[-1])[None], ctx, cfg))[0])
        n = lambda x: np.linalg.norm(x, axis=-1)
        ups.append([n(hs[i + 1] - hs[i]) / n(hs[i]) for i in range(cfg.num_layers)])
        coss.append([np.sum(hs[i + 1] * hs[i], -1) / (n(hs[i + 1]) * n(hs[i])) for i in range(cfg.num_layers)])
        lasts.append([np.sum(hs[i + 1] * hs[-1], -1) / (n(hs[i + 1]) * n(hs[-1])) for i in range(cfg.num_layers)])
    cat = lambda xs: np.concatenate([np.stack(x, 0) for x in xs], axis=1).mean(1)
    # float32 states and sums against float32 NumPy on the same states: 1e-5 relative.
    np.testing.assert_allclose(dyn.update, cat(ups), rtol=1e-5)
    np.testing.assert_allclose(dyn.cosine, cat(coss), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dyn.to_last, cat(lasts), rtol=1e-5, atol=1e-6)
    assert dyn.tokens == 13
    plot_dynamics(dyn, propose_split(dyn.update), tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(dyn.to_dict())
