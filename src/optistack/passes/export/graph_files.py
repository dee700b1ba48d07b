"""The files an exported graph makes its runtime read, checked before `optistack.load_model` hands a
folder to ONNX Runtime or OpenVINO (registered with core.load_registry by session.py and openvino.py)."""
from __future__ import annotations

import posixpath
from typing import Any

from ...core.errors import LoadError


def onnx_references(path: Any, name: str) -> list[str]:
    """Every external-data file an ONNX graph points to (initializers, subgraphs, functions); a graph
    carrying session options for ONNX Runtime (`ort_config` metadata) is refused."""
    try:
        import onnx
    except ImportError:
        raise LoadError("checking an ONNX graph's external data needs the onnx package: pip install onnx") from None
    proto = onnx.load(str(path), load_external_data=False)
    if any(p.key == "ort_config" for p in proto.metadata_props):  # session options ORT may take from the graph
        raise LoadError(f"{path.name}: the graph carries 'ort_config' metadata (session options, which could name "
                        "files to write); not loaded from a folder")
    found: list[str] = []

    def tensor(t: Any) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locations = [e.value for e in t.external_data if e.key == "location"]
            found.extend(locations or ["<external tensor without a location>"])

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            tensor(s.values), tensor(s.indices)
        nodes(g.node)

    def nodes(ns: Any) -> None:
        for n in ns:
            for a in n.attribute:
                if a.HasField("t"):
                    tensor(a.t)
                for t in a.tensors:
                    tensor(t)
                if a.HasField("g"):
                    graph(a.g)
                for g in a.graphs:
                    graph(g)

    graph(proto.graph)
    for f in proto.functions:
        nodes(f.node)
    return list(dict.fromkeys(found))


def ir_references(path: Any, name: str) -> list[str]:
    """An OpenVINO IR graph (.xml) is read with the weights file of the same stem (.bin)."""
    return [posixpath.splitext(posixpath.basename(name))[0] + ".bin"]
