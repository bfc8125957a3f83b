"""How close each layer's activations come to fp16's limit, measured in fp32 PyTorch on real photos.

A file that computes in fp16 (a phone's GPU, the Neural Engine) turns any value past 65504 into
inf, and a normalization that squares deviations (LayerNorm2d's `pow`) reaches that limit when the
deviations reach 256. Seeded random weights keep activations small; a trained checkpoint can have
far larger ones, and nothing on this machine would show the file going wrong: the convert stage
measures every op's largest output on the calibration photos before it makes a file that
computes in fp16, records the tightest ops in the manifest, and keeps those under the margin in
fp32 where the format can (Core ML's per-op compute precision) or stops naming the op.

Within fp16's normal range the rounding error is relative (2^-11 of the value at any magnitude),
so the precision the gates need is lost where values leave that range: the overflow measured here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

FP16_MAX = 65504.0
"""The largest finite fp16 value."""

SAFE_MARGIN = 8.0
"""How far below FP16_MAX an op's largest output on the calibration photos must stay: other photos
can reach further than the few that were measured, and an op's inputs are rounded before it runs."""

TIGHTEST_SHOWN = 5
"""Ops per file the manifest and the validate report list, tightest first."""


class LayerHeadroom(BaseModel):
    """One op of the exported graph: its largest |output| on the calibration photos."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str
    """The torch.export node (Core ML names the op it becomes after it)."""
    module: str
    """The module the op runs in (`layers.2.blocks.0.mlp.fc1`), or "" at the top level."""
    op: str
    """The ATen op (`aten.linear.default`)."""
    max_abs: float
    headroom: float
    """How many times max_abs fits under FP16_MAX."""

    @classmethod
    def measured(cls, node: torch.fx.Node, max_abs: float) -> LayerHeadroom:
        headroom = FP16_MAX / max(max_abs, 1e-30)
        return cls(node=node.name, module=module_of(node), op=str(node.target), max_abs=max_abs, headroom=headroom)

    def describe(self) -> str:
        where = self.module or "the top level"
        return f"{self.op} in {where} (node {self.node}) reaches {self.max_abs:.4g}"


class Fp16Headroom(BaseModel):
    """A part's fp16 headroom: the tightest ops, and those under the margin."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    margin: float
    photos: int
    """Calibration inputs measured (photos for the encoder, prompt rows for a decoder)."""
    ops_measured: int
    tightest: tuple[LayerHeadroom, ...]
    """The TIGHTEST_SHOWN ops with the largest outputs, largest first."""
    below_margin: tuple[LayerHeadroom, ...]
    """Every op under the margin, in graph order: the first is where values leave fp16's range."""
    kept_fp32: tuple[str, ...] = ()
    """Nodes the converter kept in fp32 (those under the margin and the ops that read them)."""

    @property
    def holds(self) -> bool:
        return not self.below_margin

    def overflow_message(self, part: str, precision: str) -> str:
        """One line naming the first op under the margin (where values leave the range), for a
        format that cannot keep it in fp32."""
        first = self.below_margin[0]
        return (
            f"{part} {precision} would compute past fp16's range: {first.describe()} on the calibration "
            f"photos, over {FP16_MAX:.0f} / margin {self.margin:g} = {FP16_MAX / self.margin:.0f}"
            f" ({len(self.below_margin)} op(s) under the margin); convert it as fp32, or as Core ML, which keeps"
            " such ops in fp32"
        )


class _RangeRecorder(torch.fx.Interpreter):
    """Runs an exported graph node by node, keeping each op's largest |output|."""

    def __init__(self, module: torch.fx.GraphModule, maxima: dict[str, float]) -> None:
        super().__init__(module)
        self.maxima = maxima

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.op == "call_function":
            largest = _largest_abs(value)
            if largest is not None:
                self.maxima[n.name] = max(self.maxima.get(n.name, 0.0), largest)
        return value


def _largest_abs(value: Any) -> float | None:
    tensors = [v for v in (value if isinstance(value, list | tuple) else [value]) if isinstance(v, torch.Tensor)]
    floats = [t for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return None
    return max(float(max(-low, high)) for low, high in (torch.aminmax(t.detach()) for t in floats))  # no |t| copy


def _graph_inputs(program: Any, user_inputs: Sequence[torch.Tensor]) -> list[Any]:
    """The lifted graph's placeholders in order: parameters, buffers and constants, then the inputs."""
    from torch.export.graph_signature import InputKind

    supplied = iter(user_inputs)
    values = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            values.append(next(supplied))
        elif spec.target in program.state_dict:
            values.append(program.state_dict[spec.target])
        else:
            values.append(program.constants[spec.target])
    return values


def module_of(node: torch.fx.Node) -> str:
    """The innermost module path a node of an exported program ran in ("" at the top level)."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else ""


def measure_fp16_headroom(
    program: Any, input_names: Sequence[str], samples: Iterable[dict[str, np.ndarray]], margin: float = SAFE_MARGIN
) -> Fp16Headroom:
    """Every op's largest |output| over `samples` (inputs by name), in fp32, in `program`
    (`pipeline.export_wrappers.exported_program`); the tightest TIGHTEST_SHOWN and every op under `margin`."""
    maxima: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for sample in samples:
            inputs = [torch.from_numpy(np.ascontiguousarray(sample[name])) for name in input_names]
            _RangeRecorder(program.graph_module, maxima).run(*_graph_inputs(program, inputs))
            count += 1
    in_graph_order = [
        LayerHeadroom.measured(node, maxima[node.name]) for node in program.graph.nodes if node.name in maxima
    ]
    return Fp16Headroom(
        margin=margin,
        photos=count,
        ops_measured=len(in_graph_order),
        tightest=tuple(sorted(in_graph_order, key=lambda layer: -layer.max_abs)[:TIGHTEST_SHOWN]),
        below_margin=tuple(layer for layer in in_graph_order if layer.headroom < margin),
    )


def with_readers(program: Any, nodes: Iterable[str]) -> frozenset[str]:
    """`nodes` and every op that reads one of them: an op whose input is past fp16's range must
    run in fp32 too, or the cast to its fp16 input overflows."""
    named = {node.name: node for node in program.graph.nodes}
    kept = set(nodes)
    for name in list(kept):
        kept.update(user.name for user in named[name].users if user.op == "call_function")
    return frozenset(kept)
