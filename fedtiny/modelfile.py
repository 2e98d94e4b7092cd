"""Quantized models on disk: a `Graph` in the fedtiny container (kind MODL). See fedtiny.fileformat."""

from pathlib import Path

import numpy as np

from .fileformat import FileFormatError, dumps, load, loads, save
from .ir import Graph, GraphError, Op, Tensor, validate

KIND = b"MODL"


def _header(graph: Graph) -> dict:
    return dict(
        tensors=[dict(name=t.name, shape=list(t.shape), dtype=t.dtype, scale=[float(s) for s in t.scale],
                      zero_point=int(t.zero_point), constant=t.is_constant) for t in graph.tensors.values()],
        ops=[dict(kind=op.kind, inputs=op.inputs, outputs=op.outputs, attrs=op.attrs, origin=op.origin)
             for op in graph.ops],
        inputs=graph.inputs, outputs=graph.outputs, meta=graph.meta)


def to_bytes(graph: Graph) -> bytes:
    return dumps(KIND, _header(graph), {t.name: t.data for t in graph.constants})


def save_model(graph: Graph, path: str | Path) -> None:
    save(path, KIND, _header(graph), {t.name: t.data for t in graph.constants})


def graph_from(header: dict, arrays: dict[str, np.ndarray], source: str) -> Graph:
    """Rebuild and validate a Graph; any inconsistency is a FileFormatError naming the source."""
    try:
        tensors = {}
        for t in header["tensors"]:
            data = arrays[t["name"]] if t["constant"] else None
            tensors[t["name"]] = Tensor(t["name"], tuple(int(d) for d in t["shape"]), t["dtype"],
                                        np.asarray(t["scale"], dtype=np.float64), int(t["zero_point"]), data)
        ops = [Op(o["kind"], list(o["inputs"]), list(o["outputs"]), dict(o["attrs"]), str(o["origin"]))
               for o in header["ops"]]
        graph = Graph(tensors, ops, list(header["inputs"]), list(header["outputs"]), dict(header["meta"]))
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise GraphError("a model has exactly one input and one output")
        validate(graph)
    except FileFormatError:
        raise
    except (GraphError, KeyError, TypeError, ValueError, IndexError, ArithmeticError) as err:
        raise FileFormatError(f"{source}: invalid model: {err}") from err
    return graph


def from_bytes(data: bytes, source: str = "<bytes>") -> Graph:
    return graph_from(*loads(data, KIND, source), source)


def load_model(path: str | Path) -> Graph:
    return graph_from(*load(path, KIND), str(path))
