"""fusion_prepass.simplify_for_fusion: what it removes, what it keeps, and that the graph still
computes the same bits (ONNX Runtime on the CPU).

    python3 -m unittest discover -s onnx -p "test_*.py"

Needs onnx, onnxruntime and numpy only.
"""

import unittest

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fusion_prepass import simplify_for_fusion


def _graph():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])
    bias = numpy_helper.from_array(np.array([0.5, -1.25, 3.0], dtype=np.float32))
    scale = numpy_helper.from_array(np.array([1.5], dtype=np.float32))
    nodes = [
        helper.make_node("Constant", [], ["bias"], value=bias),
        helper.make_node("Constant", [], ["scale"], value=scale),
        helper.make_node("Constant", [], ["z"], value=bias),  # a graph output: stays a node
        helper.make_node("Add", ["x", "bias"], ["a"]),
        helper.make_node("Identity", ["a"], ["b"]),
        helper.make_node("Identity", ["b"], ["c"]),
        helper.make_node("Cast", ["c"], ["d"], to=TensorProto.FLOAT),  # float to float: no-op
        helper.make_node("Cast", ["d"], ["e"], to=TensorProto.FLOAT16),  # a real conversion
        helper.make_node("Cast", ["e"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "scale"], ["g"]),
        helper.make_node("Identity", ["g"], ["y"]),  # produces a graph output: kept
    ]
    graph = helper.make_graph(nodes, "prepass", [x], [y, z])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _run(model):
    options = ort.SessionOptions()
    # Each graph computed as written: ONNX Runtime's own optimizations would remove the same nodes.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.array([[0.1, 0.2, 0.3], [1e-3, -7.0, 65504.0]], dtype=np.float32)
    return session.run(None, {"x": x})


class SimplifyForFusion(unittest.TestCase):
    def test_removes_constants_and_no_ops_and_keeps_outputs(self):
        model = _graph()
        counts = simplify_for_fusion(model)
        self.assertEqual(counts, {"constants": 2, "no_ops": 3})
        ops = [node.op_type for node in model.graph.node]
        self.assertEqual(ops, ["Constant", "Add", "Cast", "Cast", "Mul", "Identity"])
        self.assertEqual(sorted(t.name for t in model.graph.initializer), ["bias", "scale"])
        add = model.graph.node[1]
        self.assertEqual(list(add.input), ["x", "bias"])
        to_half = model.graph.node[2]
        self.assertEqual(list(to_half.input), ["a"], "the Identity chain and the no-op Cast are bypassed")
        self.assertEqual([o.name for o in model.graph.output], ["y", "z"])
        onnx.checker.check_model(model)

    def test_the_graph_computes_the_same_bits(self):
        before = _run(_graph())
        model = _graph()
        simplify_for_fusion(model)
        after = _run(model)
        for a, b in zip(before, after):
            self.assertEqual(a.dtype, b.dtype)
            self.assertEqual(a.tobytes(), b.tobytes())


if __name__ == "__main__":
    unittest.main()
