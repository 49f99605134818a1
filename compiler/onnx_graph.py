"""A thin builder over `onnx.helper`: unique names, typed constants, initializers, value_info.

Graph construction stays readable (`g.op("MatMul", x, w)` returns the output name) and every
node output gets a unique, descriptive name. Subgraphs (Loop bodies) are builders too; they
share the parent's initializer table so weights are stored once and read from the outer scope.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16,
          np.dtype("int64"): TensorProto.INT64, np.dtype("int32"): TensorProto.INT32,
          np.dtype("uint8"): TensorProto.UINT8, np.dtype("bool"): TensorProto.BOOL, np.dtype("int8"): TensorProto.INT8}

OPSET = 23
MS_DOMAIN = "com.microsoft"


class GraphBuilder:
    def __init__(self, name: str, parent: GraphBuilder | None = None, float_dtype=np.float32):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.parent = parent
        self.root = parent.root if parent else self
        self.contract_inputs: list = []
        self.contract_outputs: list = []
        self.float_dtype = np.dtype(float_dtype)
        if parent is None:
            self.initializers: dict[str, onnx.TensorProto] = {}
            self.initializer_kind: dict[str, str] = {}  # name -> shared | lora | embedding | other
            self._counter = itertools.count()
            self._constants: dict[tuple, str] = {}

    # -- names and constants ----------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self.root._counter)}"

    def initializer(self, name: str, array: np.ndarray, kind: str = "other") -> str:
        """Add a weight to the root graph (stored once, visible from every subgraph)."""
        root = self.root
        if name in root.initializers:
            raise ValueError(f"duplicate initializer {name}")
        root.initializers[name] = numpy_helper.from_array(np.require(array, requirements="C"), name)
        root.initializer_kind[name] = kind
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, deduplicated, stored as a root initializer."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        root = self.root
        if key not in root._constants:
            name = f"const_{len(root._constants)}"
            root.initializers[name] = numpy_helper.from_array(arr, name)
            root.initializer_kind[name] = "other"
            root._constants[key] = name
        return root._constants[key]

    def fconst(self, value) -> str:
        return self.const(value, self.float_dtype)

    # -- nodes -------------------------------------------------------------------------------

    def op(self, op_type: str, *inputs: str, name: str | None = None, outputs: int = 1, domain: str = "",
           **attrs):
        outs = [self.fresh(name or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"n_{op_type}"),
                                           domain=domain or None, **attrs))
        return outs[0] if outputs == 1 else outs

    def op_to(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> None:
        """A node with caller-chosen output names (graph outputs, Loop outputs)."""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.fresh(f"n_{op_type}"),
                                           domain=domain or None, **attrs))

    def ms(self, op_type: str, *inputs: str, **kw):
        return self.op(op_type, *inputs, domain=MS_DOMAIN, **kw)

    # -- I/O ---------------------------------------------------------------------------------

    def input(self, name: str, dtype, shape, role: str | None = None, kv: str | None = None) -> str:
        """A graph input; `role` records it in the artifact contract (what the runtime binds there)."""
        self.inputs.append(helper.make_tensor_value_info(name, DTYPES[np.dtype(dtype)], shape))
        if role:
            self.contract_inputs.append(_spec(name, role, dtype, shape, kv))
        return name

    def output(self, name: str, dtype, shape, role: str | None = None, kv: str | None = None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, DTYPES[np.dtype(dtype)], shape))
        if role:
            self.contract_outputs.append(_spec(name, role, dtype, shape, kv))
        return name

    def entry_point(self, symbol: str):
        """The contract's description of this graph as an entry point stored in `symbol`."""
        from edgeloop.runtimes.contract import EntryPoint

        return EntryPoint(symbol, tuple(self.contract_inputs), tuple(self.contract_outputs))

    def graph(self, with_initializers: bool) -> onnx.GraphProto:
        inits = list(self.initializers.values()) if with_initializers else []
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=inits,
                                 value_info=self.value_info)

    def model(self) -> onnx.ModelProto:
        """The graph as a model. The weights move into it one tensor at a time (the builder keeps none):
        make_model copies the graph it is given, so one built with its weights would exist three times
        at once — for a large model, that was the compiler's peak memory."""
        assert self.parent is None
        m = helper.make_model(self.graph(False), producer_name="edgeloop",
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
        m.ir_version = 10
        for name in list(self.initializers):
            m.graph.initializer.append(self.initializers.pop(name))
        return m


def _spec(name: str, role: str, dtype, shape, kv: str | None):
    from edgeloop.runtimes.contract import TensorSpec

    return TensorSpec(name, role, np.dtype(dtype).name, tuple(shape), kv)
