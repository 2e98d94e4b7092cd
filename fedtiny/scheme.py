"""Update schemes: which tensors of an int8 graph train on the device.

Layers are the graph's conv2d ops (convs and linears) in order; the classifier is the last one. A scheme says
which layers update their bias and, for chosen layers, which fraction of their output channels update their
weights (the first ceil(r * Cout) channels, so the trainable rows are one contiguous block).

Text forms, as the CLI takes them:
  classifier             the last layer's weights and bias
  bias                   every bias, plus the classifier's weights (TinyTL-style)
  last:K                 the last K layers, weights and biases
  full                   every weight and bias
  sparse:B:I@R,J@R,...   biases of the last B layers, the classifier's weights, and layer I's weights at
                         ratio R (R in 1/8, 1/4, 1/2, 1; I may be negative, counting from the end)
"""

import math
from dataclasses import dataclass, field
from fractions import Fraction

from .ir import Graph

RATIOS = (Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1))

# A hand-picked sparse scheme per zoo model: the last biases (cheap: no activations saved, only ReLU bits), the
# classifier, and the last pointwise conv at a fraction of its channels (the paper finds pointwise convs of late
# blocks pay the most). The default of `compile` and `simulate` before `auto` (fedtiny.search) became it; a fixed
# reference that tests and benchmarks measure.
REFERENCE_SPARSE = {"sensor_cnn": "sparse:3:-2@1/8", "mobilenet": "sparse:6:-2@1/2,-5@1/4", "mlp": "last:2"}


class SchemeError(ValueError):
    """A scheme that does not fit the model, or does not parse."""


@dataclass(frozen=True)
class Scheme:
    bias_layers: int  # biases of the last `bias_layers` layers train
    weight_ratios: dict[int, Fraction] = field(default_factory=dict)  # layer index (>= 0) -> channel ratio
    name: str = ""

    def weight_channels(self, layer: int, cout: int) -> int:
        ratio = self.weight_ratios.get(layer)
        return 0 if ratio is None else math.ceil(ratio * cout)

    def trains_bias(self, layer: int, n_layers: int) -> bool:
        return layer >= n_layers - self.bias_layers


def layers(graph: Graph) -> list[int]:
    """Indexes into graph.ops of the layers a scheme counts (conv2d ops, the classifier last)."""
    return [i for i, op in enumerate(graph.ops) if op.kind == "conv2d"]


def _ratio(text: str, spec: str) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError) as err:
        raise SchemeError(f"{spec!r}: channel ratio {text!r} is not a number") from err
    if value not in RATIOS:
        raise SchemeError(f"{spec!r}: channel ratio {text} must be one of 1/8, 1/4, 1/2, 1")
    return value


def parse(spec: str, graph: Graph) -> Scheme:
    """Parse a scheme's text form against a graph, checking every layer index and ratio."""
    n = len(layers(graph))
    if n == 0:
        raise SchemeError("the model has no conv or linear layer to train")
    last = n - 1
    kind, _, rest = spec.partition(":")
    if kind == "classifier" and not rest:
        return Scheme(1, {last: Fraction(1)}, spec)
    if kind == "bias" and not rest:
        return Scheme(n, {last: Fraction(1)}, spec)
    if kind == "full" and not rest:
        return Scheme(n, {i: Fraction(1) for i in range(n)}, spec)
    if kind == "last":
        try:
            k = int(rest)
        except ValueError as err:
            raise SchemeError(f"{spec!r}: 'last:K' needs a whole number of layers") from err
        if not 1 <= k <= n:
            raise SchemeError(f"{spec!r}: the model has {n} layers, so K must be 1..{n}")
        return Scheme(k, {i: Fraction(1) for i in range(n - k, n)}, spec)
    if kind == "sparse":
        bias_text, _, weights_text = rest.partition(":")
        try:
            bias_layers = int(bias_text)
        except ValueError as err:
            raise SchemeError(f"{spec!r}: 'sparse:B:...' needs B, a whole number of bias layers") from err
        if not 1 <= bias_layers <= n:
            raise SchemeError(f"{spec!r}: the model has {n} layers, so B must be 1..{n}")
        ratios = {last: Fraction(1)}
        for item in filter(None, weights_text.split(",")):
            index_text, at, ratio_text = item.partition("@")
            if not at:
                raise SchemeError(f"{spec!r}: weight entry {item!r} must read LAYER@RATIO, e.g. -2@1/4")
            try:
                index = int(index_text)
            except ValueError as err:
                raise SchemeError(f"{spec!r}: layer {index_text!r} is not an integer") from err
            if not -n <= index < n:
                raise SchemeError(f"{spec!r}: layer {index} does not exist; the model has layers 0..{last} "
                                  f"(or -{n}..-1)")
            index %= n
            if index < n - bias_layers:
                raise SchemeError(f"{spec!r}: layer {index} updates weights outside the bias range (the last "
                                  f"{bias_layers} layers, {n - bias_layers}..{last}); its gradient would not be "
                                  "computed")
            ratios[index] = _ratio(ratio_text, spec)
        return Scheme(bias_layers, ratios, spec)
    raise SchemeError(f"unknown scheme {spec!r}; use classifier, bias, last:K, full or sparse:B:I@R,...")
