"""The torch.fx front-end: ``detect_adapters`` / ``fuse_adapters`` on ExportedProgram and GraphModule.

``torch.export.ExportedProgram`` in, ``ExportedProgram`` out (a new program: new fused weights
are real parameters in its ``state_dict`` and ``graph_signature``, old ones that became unused
are removed, and the result passes the program's own verifier). ``torch.fx.GraphModule`` in,
``GraphModule`` out (a copy; new weights are registered parameters read by ``get_attr``).

Detection and rewriting live in :mod:`zflora_compile.passes.detect_fx` and
:mod:`zflora_compile.passes.rewrite_fx`; the fused weights come from the shared planner
(:mod:`zflora_compile.planner`), exactly as for ONNX. The rewrite is verified in PyTorch
eager on seeded inputs with the ONNX path's tolerances (:data:`zflora_compile.verify.TOLERANCES`).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np
import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputSpec, TensorArgument
from torch.utils import _pytree as pytree

from zflora_compile.errors import InputError, VerificationError
from zflora_compile import families
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO, Detection
from zflora_compile.graph.torch_fx import FxConstants, FxGraph
from zflora_compile.passes.detect_fx import _val, op_name, torch_dtype_name
from zflora_compile.planner import STRATEGIES, Plan, plan
from zflora_compile.verify import TOLERANCES, compare, verification_failure_message

__all__ = ["detect_fx", "fuse_fx", "fuse_fx_with_report", "is_fx_model", "linear_op_count", "verify_fx"]

_LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
GEMM_OPS = ("linear", "mm", "addmm", "matmul", "bmm")


def is_fx_model(model: Any) -> bool:
    return isinstance(model, (ExportedProgram, torch.fx.GraphModule))


def linear_op_count(model) -> int:
    """Number of GEMM-like aten nodes (linear, mm, addmm, matmul, bmm) in the graph."""
    graph = model.graph
    return sum(1 for node in graph.nodes if op_name(node) in GEMM_OPS)


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


def _edit(model, *, copy_module: bool = True):
    if isinstance(model, ExportedProgram):
        return _ProgramEdit(model)
    if isinstance(model, torch.fx.GraphModule):
        _check_aten_graph(model)
        return _ModuleEdit(model, copy_module=copy_module)
    raise TypeError(f"expected torch.export.ExportedProgram or torch.fx.GraphModule, got {type(model).__name__}")


def _detect(gm: torch.fx.GraphModule, constants: FxConstants, max_rank_ratio: float) -> Detection:
    """LoRA, then FFA / FBA / FFBA / zFLoRA lanes (the same records as the ONNX front-end)."""
    return families.detect(FxGraph(gm, constants), max_rank_ratio=max_rank_ratio)


def detect_fx(model, *, max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> Detection:
    """Adapter sites of an ExportedProgram or GraphModule (the model is not modified)."""
    if isinstance(model, ExportedProgram):
        sig = model.graph_signature
        getters = {}
        for spec in sig.input_specs:
            if spec.kind in _LIFTED and isinstance(spec.arg, TensorArgument):
                source = model.state_dict if spec.target in model.state_dict else model.constants
                getters[spec.arg.name] = functools.partial(lambda s, t: s[t].detach(), source, spec.target)
        return _detect(model.graph_module, FxConstants(model.graph_module, getters), max_rank_ratio)
    if isinstance(model, torch.fx.GraphModule):
        _check_aten_graph(model)
        return _detect(model, FxConstants(model), max_rank_ratio)
    raise TypeError(f"expected torch.export.ExportedProgram or torch.fx.GraphModule, got {type(model).__name__}")


def fuse_fx_with_report(
    model,
    strategy: str = "fuse",
    *,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO,
    seed: int = 0,
):
    """Rewrite ``model`` (ExportedProgram or GraphModule; not modified) and return ``(result, report)``."""
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    edit = _edit(model)
    detection = _detect(edit.gm, edit.constants, max_rank_ratio)
    the_plan: Plan = plan(detection, strategy)
    before = linear_op_count(edit.gm)
    families.rewrite(FxGraph(edit.gm, edit.constants, edit.add_constant), the_plan)
    result = edit.finish()
    report = {
        "strategy": strategy,
        "sites": [s.to_json() for s in detection.all_sites],
        "rejected": [r.to_json() for r in detection.rejections],
        "plan": the_plan.to_json(),
        "gemm_count": {"input": before, "output": linear_op_count(result)},
    }
    if verify:
        reference = _strip_reference(model, max_rank_ratio) if strategy == "strip" and detection.all_sites else model
        outcome = verify_fx(reference, result, atol=atol, rtol=rtol, seed=seed)
        outcome["reference"] = "the input model" if reference is model else "the input model with every detected adapter's B set to zero"
        report["verification"] = outcome
        if not outcome["passed"]:
            raise VerificationError(verification_failure_message(outcome), report)
    else:
        report["verification"] = {"passed": None, "skipped": "verify=False"}
    return result, report


def fuse_fx(model, strategy: str = "fuse", **options):
    """:func:`fuse_fx_with_report` without the report."""
    return fuse_fx_with_report(model, strategy, **options)[0]


def _strip_reference(model, max_rank_ratio: float) -> torch.fx.GraphModule:
    """The input with every detected adapter's B replaced by zeros (a GraphModule)."""
    module = model.module() if isinstance(model, ExportedProgram) else model
    edit = _ModuleEdit(module, copy_module=not isinstance(model, ExportedProgram))
    detection = _detect(edit.gm, edit.constants, max_rank_ratio)
    families.disable_adapters(FxGraph(edit.gm, edit.constants, edit.add_constant), detection)
    return edit.finish()


# ---------------------------------------------------------------- verification


def _user_placeholders(model) -> list[torch.fx.Node]:
    nodes = [n for n in model.graph.nodes if n.op == "placeholder"]
    if isinstance(model, ExportedProgram):
        users = set(model.graph_signature.user_inputs)
        nodes = [n for n in nodes if n.name in users]
    return nodes


def _vocab(node: torch.fx.Node, model) -> int | None:
    """Rows of the embedding table an integer input indexes."""
    frontier = [node]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            name = op_name(user)
            if name == "embedding" and len(user.args) > 1 and user.args[1] is current:
                table = _val(user.args[0])
                if table is not None and isinstance(table.shape[0], int):
                    return int(table.shape[0])
            if name in ("view", "reshape", "_to_copy", "to", "clone", "contiguous", "unsqueeze", "squeeze", "expand"):
                frontier.append(user)
    return None


def _concrete(dim, bump: int) -> int:
    if isinstance(dim, int):
        return dim
    hint = getattr(dim.node, "hint", None)
    value = int(hint) if hint is not None else 4
    return value + bump


def synthesize_inputs(model, *, seed: int = 0, bump: int = 0) -> list[torch.Tensor]:
    """Seeded inputs for every user placeholder, from its fake-tensor metadata."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for node in _user_placeholders(model):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            if isinstance(val, (int, float, bool)) or val is None:
                values.append(val)
                continue
            raise InputError(f"cannot synthesize verification input '{node.name}' (no tensor metadata); use verify=False")
        shape = [_concrete(d, bump) for d in val.shape]
        if val.dtype.is_floating_point:
            value = (torch.randn(shape, generator=generator) * 0.5).to(val.dtype)
        elif val.dtype == torch.bool:
            value = torch.ones(shape, dtype=torch.bool)
        else:
            vocab = _vocab(node, model)
            value = torch.randint(0, vocab, shape, generator=generator, dtype=val.dtype) if vocab else torch.ones(shape, dtype=val.dtype)
        values.append(value.to(val.device))
    return values


def _runner(model):
    """A callable over flat user inputs, returning the flat outputs."""
    module = model.module() if isinstance(model, ExportedProgram) else model
    interpreter = torch.fx.Interpreter(module)

    def run(flat):
        with torch.no_grad():
            return pytree.tree_leaves(interpreter.run(*flat))

    return run


def _cases(model, seed: int) -> list[tuple[str, Any, bool]]:
    """(name, inputs, optional): the example inputs when recorded, and seeded synthesized inputs."""
    cases = []
    if isinstance(model, ExportedProgram) and model.example_inputs is not None:
        args, kwargs = model.example_inputs
        cases.append(("example inputs", ("call", args, kwargs), False))
    cases.append((f"synthesized (seed {seed})", ("flat", synthesize_inputs(model, seed=seed)), False))
    dynamic = any(not isinstance(d, int) for n in _user_placeholders(model) if isinstance(n.meta.get("val"), torch.Tensor) for d in n.meta["val"].shape)
    if dynamic:
        cases.append((f"synthesized, dynamic axes + 1 (seed {seed + 1})", ("flat", synthesize_inputs(model, seed=seed + 1, bump=1)), True))
    return cases


def _execute(model, case):
    if case[0] == "call":
        module = model.module() if isinstance(model, ExportedProgram) else model
        with torch.no_grad():
            return pytree.tree_leaves(module(*case[1], **case[2]))
    return _runner(model)(case[1])


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy()


def verify_fx(reference, candidate, *, atol: float | None = None, rtol: float | None = None, seed: int = 0) -> dict:
    """Run both programs in PyTorch eager on the same seeded inputs; compare every output."""
    results = []
    worst = {"output": None, "max_abs_diff": -1.0}
    for name, case, optional in _cases(reference, seed):
        try:
            expected = _execute(reference, case)
        except Exception as error:  # noqa: BLE001
            if optional:
                results.append({"case": name, "outputs": {}, "skipped": f"the original model does not run on it: {_first_line(error)}"})
                continue
            raise InputError(f"the original model does not run on synthesized inputs ({name}: {_first_line(error)}); use verify=False") from None
        try:
            actual = _execute(candidate, case)
        except Exception as error:  # noqa: BLE001
            outcome = {"passed": False, "reason": f"the rewritten model fails to run: {_first_line(error)}"}
            results.append({"case": name, "outputs": {"<run>": outcome}})
            continue
        outputs = {}
        for index, (ref, got) in enumerate(zip(expected, actual)):
            if not isinstance(ref, torch.Tensor):
                outputs[f"output{index}"] = {"passed": ref == got, "reason": f"{got!r} != {ref!r}"} if ref != got else {"passed": True}
                continue
            default_atol, default_rtol = TOLERANCES.get(torch_dtype_name(ref.dtype), (0.0, 0.0))
            tol = (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)
            outcome = compare(_as_numpy(ref), _as_numpy(got), *tol)
            outcome["dtype"] = torch_dtype_name(ref.dtype)
            outputs[f"output{index}"] = outcome
            if outcome.get("max_abs_diff", float("inf")) > worst["max_abs_diff"]:
                worst = {"output": f"output{index}", "case": name, "max_abs_diff": outcome.get("max_abs_diff", float("inf"))}
        if len(expected) != len(actual):
            outputs["<outputs>"] = {"passed": False, "reason": f"{len(actual)} outputs != {len(expected)}"}
        results.append({"case": name, "outputs": outputs})
    passed = all(o["passed"] for r in results for o in r["outputs"].values())
    return {
        "passed": passed,
        "runtime": f"torch {torch.__version__} eager",
        "seed": seed,
        "rule": "|rewritten - original| <= atol + rtol * |original|, elementwise, every output",
        "tolerances": {k: {"atol": a if atol is None else atol, "rtol": r if rtol is None else rtol} for k, (a, r) in TOLERANCES.items()},
        "worst": worst,
        "cases": results,
    }
