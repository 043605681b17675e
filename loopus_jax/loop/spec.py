"""Layer specs in the authors' syntax, and the encoder / reasoning / decoder split they define.

Syntax (one spec per block): "0,1,2" a list; "2" layers 0..2; "3-7" or "3..7" a closed range;
"13-" or "13.." layer 13 to the last; "none" (or "empty", "[]") no layers. The reasoning block is
every layer in neither the encoder nor the decoder. We require the encoder to be a prefix, the
decoder a suffix and the reasoning block non-empty, so the three blocks run in layer order.
"""

from __future__ import annotations

import dataclasses

from loopus_jax.errors import LoopusError


@dataclasses.dataclass(frozen=True)
class LayerSplit:
    encoder: tuple[int, ...]
    reasoning: tuple[int, ...]
    decoder: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.encoder) + len(self.reasoning) + len(self.decoder)

    def specs(self) -> tuple[str, str]:
        """The (encoder, decoder) layer specs that reproduce this split."""

        def spec(ix: tuple[int, ...]) -> str:
            return "none" if not ix else f"{ix[0]}-{ix[-1]}"

        return spec(self.encoder), spec(self.decoder)

    def flags(self) -> str:
        """The `--encoder/--decoder` flags that reproduce this split."""
        enc, dec = self.specs()
        return f"--encoder {enc} --decoder {dec}"


def parse_layer_spec(raw: str, num_layers: int) -> tuple[int, ...]:
    """Indices named by one spec for a model of `num_layers` layers, sorted."""
    bad = f"bad layer spec {raw!r} for a model with {num_layers} layers (layers 0..{num_layers - 1})"
    text = raw.strip()
    if text.lower() in ("none", "empty", "[]"):
        return ()
    text = text.replace("..", "-")
    try:
        if "," in text:
            ix = [int(x) for x in text.split(",")]
        elif text.endswith("-"):
            ix = list(range(int(text[:-1]), num_layers))
            if not ix:
                raise LoopusError(f"{bad}: the open range starts past the last layer")
        elif "-" in text[1:]:
            a, b = text.split("-", 1)
            if int(b) < int(a):
                raise LoopusError(f"{bad}: the range ends before it starts")
            ix = list(range(int(a), int(b) + 1))
        else:
            ix = list(range(int(text) + 1))
    except ValueError:
        raise LoopusError(f"{bad}; use '0,1,2', '2' (0..2), '3-7', '3..7', '13-', '13..' or 'none'") from None
    out = [i for i in ix if not 0 <= i < num_layers]
    if out:
        raise LoopusError(f"{bad}: index {out[0]} is out of range")
    if len(set(ix)) != len(ix):
        raise LoopusError(f"{bad}: repeated index")
    return tuple(sorted(ix))


def split_layers(encoder: str, decoder: str, num_layers: int) -> LayerSplit:
    """The three blocks for encoder/decoder specs; every invalid split is a LoopusError naming L."""
    return make_split(parse_layer_spec(encoder, num_layers), parse_layer_spec(decoder, num_layers), num_layers)


def make_split(enc: tuple[int, ...], dec: tuple[int, ...], num_layers: int) -> LayerSplit:
    where = f"for a model with {num_layers} layers"
    overlap = sorted(set(enc) & set(dec))
    if overlap:
        raise LoopusError(f"encoder and decoder overlap at layer(s) {overlap} {where}")
    if enc and enc != tuple(range(len(enc))):
        raise LoopusError(f"the encoder must be a contiguous prefix 0..k {where}, got {list(enc)}")
    if dec and dec != tuple(range(num_layers - len(dec), num_layers)):
        raise LoopusError(f"the decoder must be a contiguous suffix k..{num_layers - 1} {where}, got {list(dec)}")
    reasoning = tuple(i for i in range(num_layers) if i not in enc and i not in dec)
    if not reasoning:
        raise LoopusError(f"no layers are left for the reasoning block {where} (encoder {list(enc)}, decoder {list(dec)})")
    return LayerSplit(tuple(enc), reasoning, tuple(dec))
