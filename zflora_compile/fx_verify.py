"""Verification of a rewritten torch.fx program: both run in PyTorch eager on the same seeded inputs.

Every output is compared with the ONNX path's rule and tolerances (:data:`zflora_compile.verify.TOLERANCES`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from zflora_compile.errors import InputError, first_line
from zflora_compile.graph.torch_fx import op_name, tensor_meta, torch_dtype_name
from zflora_compile.verify import TOLERANCES, compare, verification_section


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
                table = tensor_meta(user.args[0])
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


def _input_shapes(model, case) -> dict:
    """The shape of every user input of a case, by placeholder name."""
    values = pytree.tree_leaves((case[1], case[2])) if case[0] == "call" else case[1]
    names = [n.name for n in _user_placeholders(model)]
    return {name: list(v.shape) if isinstance(v, torch.Tensor) else v for name, v in zip(names, values)}


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
        inputs = _input_shapes(reference, case)
        try:
            expected = _execute(reference, case)
        except Exception as error:  # noqa: BLE001
            if optional:
                results.append({"case": name, "inputs": inputs, "outputs": {}, "skipped": f"the original model does not run on it: {first_line(error)}"})
                continue
            raise InputError(f"the original model does not run on synthesized inputs ({name}: {first_line(error)}); use verify=False") from None
        try:
            actual = _execute(candidate, case)
        except Exception as error:  # noqa: BLE001
            outcome = {"passed": False, "reason": f"the rewritten model fails to run: {first_line(error)}"}
            results.append({"case": name, "inputs": inputs, "outputs": {"<run>": outcome}})
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
        results.append({"case": name, "inputs": inputs, "outputs": outputs})
    return verification_section(f"torch {torch.__version__} eager", results, worst, seed=seed, atol=atol, rtol=rtol)
