"""The streaming ONNX external-data scanner, against models built with the onnx package."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.bundle.onnx_external import ExternalDataRef, check_no_external_data, find_external_data
from edge_runtime.errors import ManifestError, UnsafeBundleError

OPSET = [helper.make_opsetid("", 17)]


def external_tensor(name: str, location: str | None) -> TensorProto:
    """A float tensor marked EXTERNAL; ``location=None`` leaves external_data empty."""
    t = helper.make_tensor(name, TensorProto.FLOAT, [2], [0.0, 0.0])
    del t.float_data[:]
    t.data_location = TensorProto.EXTERNAL
    if location is not None:
        for key, value in (("location", location), ("offset", "0"), ("length", "8")):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return t


def inline_tensor(name: str) -> TensorProto:
    return numpy_helper.from_array(np.ones(2, np.float32), name)


def out(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])


def graph(
    nodes: list[onnx.NodeProto], outputs: list[str], inits: Sequence[TensorProto] = ()
) -> onnx.GraphProto:
    return helper.make_graph(nodes, "g", [], [out(o) for o in outputs], list(inits))


def save(model: onnx.ModelProto, path: Path) -> Path:
    # Serialise by hand: onnx.save_model would try to resolve external files.
    path.write_bytes(model.SerializeToString())
    return path


def model_initializer(location: str | None) -> onnx.ModelProto:
    g = graph([helper.make_node("Identity", ["w"], ["y"])], ["y"], [external_tensor("w", location)])
    return helper.make_model(g, opset_imports=OPSET)


def model_if_subgraph() -> onnx.ModelProto:
    then_t = external_tensor("t", "../then.bin")
    then_g = graph([helper.make_node("Identity", ["t"], ["ty"])], ["ty"], [then_t])
    else_g = graph([helper.make_node("Identity", ["e"], ["ey"])], ["ey"], [inline_tensor("e")])
    cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)
    return helper.make_model(graph([node], ["y"], [cond]), opset_imports=OPSET)


def model_function_body() -> onnx.ModelProto:
    const = helper.make_node("Constant", [], ["k"], value=external_tensor("k", "/etc/shadow"))
    add = helper.make_node("Add", ["x", "k"], ["y"])
    fn = helper.make_function("local", "F", ["x"], ["y"], [const, add], OPSET)
    call = helper.make_node("F", ["w"], ["y"], domain="local")
    g = graph([call], ["y"], [inline_tensor("w")])
    return helper.make_model(g, opset_imports=[*OPSET, helper.make_opsetid("local", 1)], functions=[fn])


def model_function_default_attribute() -> onnx.ModelProto:
    default = helper.make_attribute("k", external_tensor("dflt", "default.bin"))
    fn = helper.make_function("local", "F", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                              OPSET, attribute_protos=[default])
    g = graph([helper.make_node("Identity", ["w"], ["y"])], ["y"], [inline_tensor("w")])
    return helper.make_model(g, opset_imports=OPSET, functions=[fn])


def model_sparse_initializer() -> onnx.ModelProto:
    sparse = helper.make_sparse_tensor(
        external_tensor("sv", "sparse.bin"), helper.make_tensor("si", TensorProto.INT64, [1], [0]), [2]
    )
    g = graph([helper.make_node("Identity", ["sv"], ["y"])], ["y"])
    g.sparse_initializer.append(sparse)
    return helper.make_model(g, opset_imports=OPSET)


def model_training_info() -> onnx.ModelProto:
    m = model_initializer(None)
    m.graph.ClearField("initializer")
    m.graph.initializer.append(inline_tensor("w"))
    init = graph([helper.make_node("Identity", ["z"], ["w2"])], ["w2"], [external_tensor("z", "train.bin")])
    m.training_info.add().initialization.CopyFrom(init)
    return m


def model_tensors_attribute() -> onnx.ModelProto:
    ts = [inline_tensor("a"), external_tensor("b", "b.bin")]
    node = helper.make_node("Custom", [], ["y"], domain="x", ts=ts)
    return helper.make_model(graph([node], ["y"]), opset_imports=OPSET)


def model_sparse_attribute() -> onnx.ModelProto:
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]), external_tensor("idx", "idx.bin"), [2]
    )
    node = helper.make_node("Constant", [], ["y"], sparse_value=sparse)
    return helper.make_model(graph([node], ["y"]), opset_imports=OPSET)


CASES: list[tuple[str, Callable[[], onnx.ModelProto], list[tuple[str, str, str]]]] = [
    ("initializer", lambda: model_initializer("../x"), [("w", "../x", "graph.initializer[0]")]),
    ("no-location", lambda: model_initializer(None), [("w", "", "graph.initializer[0]")]),
    ("if-subgraph", model_if_subgraph, [("t", "../then.bin", "graph.node[0].attribute[1].g.initializer[0]")]),
    ("function-body", model_function_body, [("k", "/etc/shadow", "functions[0].node[0].attribute[0].t")]),
    ("function-default", model_function_default_attribute,
     [("dflt", "default.bin", "functions[0].attribute_proto[0].t")]),
    ("sparse", model_sparse_initializer, [("sv", "sparse.bin", "graph.sparse_initializer[0].values")]),
    ("sparse-attr", model_sparse_attribute, [("idx", "idx.bin", "graph.node[0].attribute[0].sparse_tensor.indices")]),
    ("training", model_training_info, [("z", "train.bin", "training_info[0].initialization.initializer[0]")]),
    ("tensors-attr", model_tensors_attribute, [("b", "b.bin", "graph.node[0].attribute[0].tensors[1]")]),
]


@pytest.mark.parametrize(("build", "expected"), [(b, e) for _, b, e in CASES], ids=[c[0] for c in CASES])
def test_finds_external_data_everywhere(
    tmp_path: Path, build: Callable[[], onnx.ModelProto], expected: list[tuple[str, str, str]]
) -> None:
    path = save(build(), tmp_path / "m.onnx")
    assert find_external_data(path) == [ExternalDataRef(*e) for e in expected]
    with pytest.raises(UnsafeBundleError, match="external data is not allowed") as err:
        check_no_external_data(path)
    assert "\n" not in str(err.value)


def test_message_names_the_external_file(tmp_path: Path) -> None:
    path = save(model_initializer("../x"), tmp_path / "m.onnx")
    with pytest.raises(UnsafeBundleError) as err:
        check_no_external_data(path, name="model.onnx")
    assert str(err.value) == (
        "model.onnx references external data file '../x'; external data is not allowed "
        "(path traversal risk, CVE-2022-25882)"
    )


def test_finds_data_written_by_onnx_save_as_external_data(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones(4096, np.float32), "w")
    g = graph([helper.make_node("Identity", ["w"], ["y"])], ["y"], [w])
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=OPSET), path, save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    assert [r.location for r in find_external_data(path)] == ["weights.bin"]


def test_inline_models_pass(tmp_path: Path, zoo: Callable[[str], Path]) -> None:
    assert find_external_data(zoo("ppocr_cls")) == []
    check_no_external_data(zoo("ppocr_cls"))
    g = graph([helper.make_node("Identity", ["w"], ["y"])], ["y"], [inline_tensor("w")])
    assert find_external_data(save(helper.make_model(g, opset_imports=OPSET), tmp_path / "m.onnx")) == []


def nested_ifs(depth: int, *, external: bool = True) -> onnx.ModelProto:
    deepest = external_tensor("d", "deep.bin") if external else inline_tensor("d")
    inner = graph([helper.make_node("Identity", ["d"], ["y"])], ["y"], [deepest])
    cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
    plain = graph([helper.make_node("Identity", ["p"], ["y"])], ["y"], [inline_tensor("p")])
    for _ in range(depth):
        node = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=plain)
        inner = graph([node], ["y"], [cond])
    return helper.make_model(inner, opset_imports=OPSET)


def test_deep_subgraphs_are_walked_and_too_deep_is_refused(tmp_path: Path) -> None:
    # Each If adds three message levels (graph -> node -> attribute -> graph).
    refs = find_external_data(save(nested_ifs(15), tmp_path / "ok.onnx"))
    assert [r.location for r in refs] == ["deep.bin"]
    # onnx.helper sorts attributes by name: else_branch is [0], then_branch [1].
    assert refs[0].where == "graph." + "node[0].attribute[1].g." * 15 + "initializer[0]"
    with pytest.raises(ManifestError, match="nested deeper than 64 levels"):
        find_external_data(save(nested_ifs(25), tmp_path / "deep.onnx"))
    # Depth alone is refused, external data or not: it bounds the recursion.
    with pytest.raises(ManifestError, match="nested deeper than 64 levels"):
        find_external_data(save(nested_ifs(25, external=False), tmp_path / "deep-inline.onnx"))


def test_depth_limit_is_counted_not_guessed(tmp_path: Path) -> None:
    path = save(nested_ifs(3), tmp_path / "m.onnx")
    assert find_external_data(path, max_depth=64)
    with pytest.raises(ManifestError, match="nested deeper than 5 levels"):
        find_external_data(path, max_depth=5)


def ppocr_bytes(zoo: Callable[[str], Path]) -> bytes:
    return zoo("ppocr_cls").read_bytes()


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda z: ppocr_bytes(z)[:290_000], r"ppocr\.onnx: not a valid ONNX model: .* at byte"),
        (lambda z: ppocr_bytes(z)[:-3], r": not a valid ONNX model"),
        (lambda z: random.Random(7).randbytes(50_000), r": not a valid ONNX model"),
        (lambda z: b"", r"no ir_version or no graph"),
        (lambda z: b"\x08\x07", r"no ir_version or no graph"),  # only ir_version = 7
        (lambda z: b"\x0b\x00", r"invalid field tag 11"),  # wire type 3 (groups) is not ONNX
        (lambda z: b"\x3a\xff\xff\xff\xff\x0f", r"runs past the end"),  # graph of length 2**32-1
        (lambda z: b"\x08" + b"\xff" * 11, r"varint longer than 10 bytes"),
    ],
    ids=["truncated-half", "truncated-tail", "random", "empty", "no-graph", "group", "overlong", "varint"],
)
def test_malformed_files_are_refused_in_one_line(
    tmp_path: Path, zoo: Callable[[str], Path], make: Callable[[Callable[[str], Path]], bytes], pattern: str
) -> None:
    path = tmp_path / "ppocr.onnx"
    path.write_bytes(make(zoo))
    with pytest.raises(ManifestError, match=pattern) as err:
        check_no_external_data(path)
    assert "\n" not in str(err.value)
