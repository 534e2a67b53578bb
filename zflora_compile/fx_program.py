"""Editing torch.fx programs: a rewritable copy of an ExportedProgram or GraphModule, and detection.

``torch.export.ExportedProgram``: a new program (new fused weights are real parameters in its
``state_dict`` and ``graph_signature``, old ones that became unused are removed, and the result
passes the program's own verifier). ``torch.fx.GraphModule``: a copy; new weights are registered
parameters read by ``get_attr``.
"""

from __future__ import annotations

import collections
import copy
import functools
import hashlib
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputSpec, TensorArgument

import zflora_compile.families as families
from zflora_compile.errors import InputError
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO, Detection
from zflora_compile.graph.torch_fx import FxConstants, FxGraph, op_name
from zflora_compile.report import GraphStats

_LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def is_fx_model(model: Any) -> bool:
    return isinstance(model, (ExportedProgram, torch.fx.GraphModule))


def graph_module(model) -> torch.fx.GraphModule:
    """The GraphModule of an ExportedProgram, or the GraphModule itself."""
    return model.graph_module if isinstance(model, ExportedProgram) else model


def graph_stats(model) -> GraphStats:
    """ATen op counts and GEMM count (linear, mm, addmm, matmul, bmm) of a program or GraphModule."""
    gm = graph_module(model)
    counts = collections.Counter(op_name(n) for n in gm.graph.nodes if op_name(n))
    return GraphStats(dict(sorted(counts.items())), FxGraph(gm, None).gemm_count())


def program_digest(model) -> str:
    """sha256 of the program's code and of every parameter, buffer and constant (by name)."""
    digest = hashlib.sha256(graph_module(model).code.encode())
    tensors = dict(model.state_dict) | dict(model.constants) if isinstance(model, ExportedProgram) else model.state_dict()
    for name in sorted(tensors):
        value = tensors[name]
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _unique(name: str, taken) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def _fake_mode(graph: torch.fx.Graph):
    return detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op in ("placeholder", "get_attr")])


class _ProgramEdit:
    """A copy of an ExportedProgram's graph being rewritten, and the constants added to it."""

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        graph = copy.deepcopy(ep.graph)
        self.gm = torch.fx.GraphModule(ep.graph_module, graph)
        # every input spec (tensor, symint, constant) is keyed by its placeholder's name
        self.specs = {spec.arg.name: spec for spec in ep.graph_signature.input_specs if getattr(spec.arg, "name", None)}
        getters = {}
        for name, spec in self.specs.items():
            if spec.kind in _LIFTED and isinstance(spec.arg, TensorArgument):
                getters[name] = functools.partial(self._lifted, spec.target)
        self.constants = FxConstants(self.gm, getters)
        self.used_before = {n.name for n in graph.nodes if n.op == "placeholder" and n.users}
        self.state_dict = dict(ep.state_dict)
        self.lifted_constants = dict(ep.constants)
        self.fake_mode = _fake_mode(graph)
        self.device = _device(ep.state_dict.values())

    def _lifted(self, target: str) -> torch.Tensor:
        value = self.ep.state_dict[target] if target in self.ep.state_dict else self.ep.constants[target]
        return value.detach()

    def add_constant(self, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        graph = self.gm.graph
        target = _unique(name, set(self.state_dict) | set(self.lifted_constants))
        param = torch.nn.Parameter(tensor.to(self.device), requires_grad=False)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        params = [n for n in placeholders if n.name in self.specs and self.specs[n.name].kind == InputKind.PARAMETER]
        where = graph.inserting_after(params[-1]) if params else graph.inserting_before(next(iter(graph.nodes)))
        with where:
            node = graph.placeholder("p_" + target)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(param.data, static_shapes=True)
        self.specs[node.name] = InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=node.name), target=target, persistent=None)
        self.state_dict[target] = param
        return node

    def finish(self) -> ExportedProgram:
        graph = self.gm.graph
        removed_targets = []
        for node in list(graph.nodes):
            spec = self.specs.get(node.name)
            if node.op == "placeholder" and not node.users and node.name in self.used_before and spec is not None and spec.kind in _LIFTED:
                graph.erase_node(node)
                removed_targets.append(spec.target)
                del self.specs[node.name]
        kept_targets = {s.target for s in self.specs.values() if s.kind in _LIFTED}
        for target in removed_targets:
            if target not in kept_targets:
                self.state_dict.pop(target, None)
                self.lifted_constants.pop(target, None)
        self.gm.recompile()
        input_specs = [self.specs[node.name] for node in graph.nodes if node.op == "placeholder"]
        output_node = graph.output_node()
        outputs = list(output_node.args[0])
        renames = {}
        output_specs = []
        for spec, value in zip(self.ep.graph_signature.output_specs, outputs):
            if isinstance(spec.arg, TensorArgument) and isinstance(value, torch.fx.Node):
                if value.name != spec.arg.name:
                    renames[spec.arg.name] = value.name
                spec = OutputSpec(kind=spec.kind, arg=TensorArgument(name=value.name), target=spec.target)
            output_specs.append(spec)
        module_call_graph = copy.deepcopy(self.ep.module_call_graph)
        for entry in module_call_graph:
            if entry.signature is None:
                continue
            for arg in [*entry.signature.inputs, *entry.signature.outputs]:
                if isinstance(arg, TensorArgument) and arg.name in renames:
                    arg.name = renames[arg.name]
        return ExportedProgram(
            root=self.gm,
            graph=self.gm.graph,
            graph_signature=ExportGraphSignature(input_specs=input_specs, output_specs=output_specs),
            state_dict=self.state_dict,
            range_constraints=copy.deepcopy(self.ep.range_constraints),
            module_call_graph=module_call_graph,
            example_inputs=self.ep.example_inputs,
            constants=self.lifted_constants,
            verifiers=list(self.ep.verifiers),
        )


def _device(tensors) -> torch.device:
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    return torch.device("cpu")


class _ModuleEdit:
    """A copy of a GraphModule being rewritten; new weights become parameters read by get_attr."""

    def __init__(self, gm: torch.fx.GraphModule, *, copy_module: bool = True):
        self.gm = copy.deepcopy(gm) if copy_module else gm
        self.constants = FxConstants(self.gm)
        self.used_before = {n.name for n in self.gm.graph.nodes if n.op == "get_attr" and n.users}
        self.fake_mode = _fake_mode(self.gm.graph)
        self.device = _device(list(self.gm.parameters()) + list(self.gm.buffers()))

    def add_constant(self, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        graph = self.gm.graph
        taken = set(dict(self.gm.named_parameters(remove_duplicate=False))) | set(dict(self.gm.named_buffers(remove_duplicate=False))) | set(self.gm.__dict__)
        target = _unique(name, taken | {n for n, _ in self.gm.named_children()})
        self.gm.register_parameter(target, torch.nn.Parameter(tensor.to(self.device), requires_grad=False))
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            node = graph.get_attr(target)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(getattr(self.gm, target).data, static_shapes=True)
        return node

    def finish(self) -> torch.fx.GraphModule:
        graph = self.gm.graph
        dropped = []
        for node in list(graph.nodes):
            if node.op == "get_attr" and not node.users and node.name in self.used_before:
                dropped.append(node.target)
                graph.erase_node(node)
        still_read = {n.target for n in graph.nodes if n.op == "get_attr"}
        for target in dropped:
            if target not in still_read:
                _delete_attr(self.gm, target)
        self.gm.recompile()
        return self.gm


def _delete_attr(module: torch.nn.Module, target: str) -> None:
    *path, name = target.split(".")
    owner = functools.reduce(getattr, path, module)
    if name in owner._parameters:
        del owner._parameters[name]
    elif name in owner._buffers:
        del owner._buffers[name]
    elif hasattr(owner, name) and isinstance(getattr(owner, name), torch.Tensor):
        delattr(owner, name)


def _check_aten_graph(gm: torch.fx.GraphModule) -> None:
    """A GraphModule the front-end understands: ATen ops with shape metadata (``meta['val']``)."""
    computing = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")]
    if computing and not any("val" in n.meta for n in computing):
        raise InputError(
            "GraphModule has no shape metadata (meta['val']) on its nodes, e.g. a torch.fx.symbolic_trace graph; "
            "pass an ATen-level graph such as torch.export.export(...).module(), or the ExportedProgram itself"
        )


def edit(model, *, copy_module: bool = True):
    """A rewritable copy of ``model``: ``.gm``, ``.constants``, ``.add_constant(name, tensor)``, ``.finish()``."""
    if isinstance(model, ExportedProgram):
        return _ProgramEdit(model)
    if isinstance(model, torch.fx.GraphModule):
        _check_aten_graph(model)
        return _ModuleEdit(model, copy_module=copy_module)
    raise TypeError(f"expected torch.export.ExportedProgram or torch.fx.GraphModule, got {type(model).__name__}")


def detect_fx(model, *, max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> Detection:
    """Adapter sites of an ExportedProgram or GraphModule (the model is not modified)."""
    if isinstance(model, ExportedProgram):
        sig = model.graph_signature
        getters = {}
        for spec in sig.input_specs:
            if spec.kind in _LIFTED and isinstance(spec.arg, TensorArgument):
                source = model.state_dict if spec.target in model.state_dict else model.constants
                getters[spec.arg.name] = functools.partial(lambda s, t: s[t].detach(), source, spec.target)
        return families.detect(FxGraph(model.graph_module, FxConstants(model.graph_module, getters)), max_rank_ratio=max_rank_ratio)
    if isinstance(model, torch.fx.GraphModule):
        _check_aten_graph(model)
        return families.detect(FxGraph(model, FxConstants(model)), max_rank_ratio=max_rank_ratio)
    raise TypeError(f"expected torch.export.ExportedProgram or torch.fx.GraphModule, got {type(model).__name__}")


def strip_reference(model, max_rank_ratio: float) -> torch.fx.GraphModule:
    """The input with every detected adapter's B replaced by zeros (a GraphModule)."""
    module = model.module() if isinstance(model, ExportedProgram) else model
    zeroed = _ModuleEdit(module, copy_module=not isinstance(model, ExportedProgram))
    detection = families.detect(FxGraph(zeroed.gm, zeroed.constants), max_rank_ratio=max_rank_ratio)
    families.disable_adapters(FxGraph(zeroed.gm, zeroed.constants, zeroed.add_constant), detection)
    return zeroed.finish()
