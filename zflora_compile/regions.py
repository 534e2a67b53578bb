"""Regional verification: every rewritten region against the original region, one at a time.

What is compared, and why it is not self-referential: both graphs are read from their files (the
rewritten ``model.onnx`` as written, the input or the strip reference), never from what the
compiler says it touched. A node of the rewritten graph is *unchanged* when the original holds a
node that serialises identically (name, op type, domain, attributes, input and output names) and
whose constant inputs hold the same bytes (sha256 of each initializer, streamed from the files);
every other node is *changed*. Changed nodes connected through the values they pass each other form
a region, cut where a value can be compared (read by unchanged nodes or graph outputs, or held by
the original under the same name and type). A region's outputs are what it hands on: by induction
over the graph's order, when every region's outputs equal the original's values of the same names,
every value of the rewritten model equals the original's. The original region is walked back from
those names to values both graphs compute with identical nodes (or graph inputs); integer values
there (shape arithmetic, masks) are computed inside both regions by their own producers, float ones
are fed seeded activations, and a value only one side reads is computed from the other side's
where that is cheap. Both regions run in ONNX Runtime on the same feeds, one region at a time,
compared with :mod:`.verify`'s tolerances. A value a rewrite gave a new meaning under its old name
(merge, strip) differs where it is handed on: it is followed to where it meets the original again
(:func:`verify_regions`); a real difference reaches a graph output or persists, and fails.

What cannot be isolated makes the whole model fall back to the full check (the reason is
reported): control flow (``If`` / ``Loop`` / ``Scan`` bodies), graph inputs with defaults, a
changed signature, a fed value of unknown rank, size or type, or an original region that does not
run alone on the synthesized activations. A region is never bigger than the model: two region
sessions never hold more than the full check's two model sessions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import re
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from zflora_compile.errors import first_line

#: integer values computed inside a region (shape arithmetic) are followed back at most this far
MAX_CONTEXT_NODES = 2000
_CHUNK = 1 << 24
#: a region references weights of at least this size in their files; smaller ones (shape constants,
#: which ONNX Runtime's shape inference must read from the model itself) are copied in
REFERENCED_BYTES = 1 << 16


class CannotIsolate(Exception):
    """The model cannot be verified region by region: the message says why (full check instead)."""


@dataclasses.dataclass
class Region:
    """One changed region: its nodes in both graphs, what it reads (fed) and what it computes (compared)."""

    index: int
    rewritten: list  # ir.Node of the rewritten graph (changed nodes, then their integer context)
    original: list  # ir.Node of the original graph computing the same outputs
    inputs: list[str]
    outputs: list[str]
    changed: list[str]  # names of the changed nodes
    weight_bytes: int = 0

    @property
    def name(self) -> str:
        shown = ", ".join(repr(n) for n in self.changed[:3]) + (f" and {len(self.changed) - 3} more" if len(self.changed) > 3 else "")
        return f"region {self.index} (rewritten node(s) {shown})"

    def to_json(self) -> dict:
        return {
            "region": self.index,
            "changed_nodes": self.changed,
            "rewritten_nodes": len(self.rewritten),
            "original_nodes": [n.name for n in self.original],
            "inputs": self.inputs,
            "outputs": self.outputs,
            "weight_bytes": self.weight_bytes,
        }


def tensor_digest(tensor) -> tuple:
    """(dtype, shape, sha256 of the bytes): external data streamed from its file in chunks."""
    digest = hashlib.sha256()
    if isinstance(tensor, ir.ExternalTensor):
        left = tensor.length if tensor.length is not None else tensor.nbytes
        with open(tensor.path, "rb") as handle:
            handle.seek(tensor.offset or 0)
            while left > 0:
                chunk = handle.read(min(left, _CHUNK))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
    else:
        digest.update(tensor.tobytes())
    return (tensor.dtype, tuple(tensor.shape), digest.hexdigest())


def has_control_flow(model: ir.Model) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for node in model.graph for attr in node.attributes.values())


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.producer() is None and (value.const_value is not None or value.is_initializer())


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    found = {v.name: v for v in graph.inputs}
    found.update({name: v for name, v in graph.initializers.items()})
    for node in graph:
        found.update({v.name: v for v in node.outputs if v.name})
    return found


class _Digests:
    """Initializer digests, memoised per (graph, name)."""

    def __init__(self):
        self.memo: dict[tuple[int, str], tuple | None] = {}

    def of(self, value: ir.Value) -> tuple | None:
        key = (id(value.graph), value.name)
        if key not in self.memo:
            try:
                self.memo[key] = None if value.const_value is None else tensor_digest(value.const_value)
            except Exception:  # noqa: BLE001 - unreadable (strings, missing data): counted as changed
                self.memo[key] = None
        return self.memo[key]


def _same_node(node: ir.Node, other: ir.Node | None, digests: _Digests) -> bool:
    if other is None or node.op_type != other.op_type or node.domain != other.domain:
        return False
    if ir.serde.serialize_node(node) != ir.serde.serialize_node(other):
        return False
    for mine, theirs in zip(node.inputs, other.inputs):
        if _is_constant(mine) != _is_constant(theirs):
            return False
        if _is_constant(mine):
            left, right = digests.of(mine), digests.of(theirs)
            if left is None or left != right:
                return False
    return True


def changed_nodes(original: ir.Model, rewritten: ir.Model, digests: _Digests | None = None) -> list[ir.Node]:
    """The rewritten graph's nodes that the original does not hold identically (see module doc)."""
    digests = digests or _Digests()
    by_name: dict[str, ir.Node | None] = {}
    for node in original.graph:
        by_name[node.name] = None if node.name in by_name else node  # a repeated name matches nothing
    return [node for node in rewritten.graph if not (node.name and _same_node(node, by_name.get(node.name), digests))]


def _check_signature(original: ir.Model, rewritten: ir.Model) -> None:
    if has_control_flow(original) or has_control_flow(rewritten):
        raise CannotIsolate("the model has control flow (If / Loop / Scan subgraphs); their bodies are checked by running the whole model")
    for model, which in ((original, "original"), (rewritten, "rewritten")):
        defaulted = [v.name for v in model.graph.inputs if v.is_initializer() or v.const_value is not None]
        if defaulted:
            raise CannotIsolate(f"the {which} model has graph inputs with defaults ('{defaulted[0]}'): the full check feeds them")
    shared = set(original.opset_imports) & set(rewritten.opset_imports)
    if any(original.opset_imports[d] != rewritten.opset_imports[d] for d in shared) or "" in set(original.opset_imports) ^ set(rewritten.opset_imports):
        raise CannotIsolate("the opset imports differ")  # a domain only one side imports (ONNX Runtime's contrib ops) is that side's
    signature = [(v.name, v.dtype) for v in original.graph.inputs], [v.name for v in original.graph.outputs]
    if signature != ([(v.name, v.dtype) for v in rewritten.graph.inputs], [v.name for v in rewritten.graph.outputs]):
        raise CannotIsolate("the graph inputs or outputs differ; the full check reports how")


def _components(changed: list[ir.Node], outputs: set[str], joined: set[str] = frozenset(), comparable: set[str] = frozenset()) -> list[list[ir.Node]]:
    """Changed nodes grouped by the values they pass each other, cut where a value can be compared
    instead: one unchanged nodes or the graph outputs read too, or a float value the original holds
    under the same name with the same type (``comparable``; ONNX Runtime GenAI's skip-norms carry
    the residual stream from layer to layer, each changed by the projection it adds): it is
    compared where it is computed and fed to its readers. ``joined`` values are never cut;
    constants do not connect."""
    parent = {id(n): id(n) for n in changed}

    def root(key):
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for node in changed:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is None or id(producer) not in parent:
                continue
            if value.name not in joined and (value.name in outputs or value.name in comparable or any(id(user) not in parent for user, _ in value.uses())):
                continue
            parent[root(id(producer))] = root(id(node))
    groups: dict[int, list[ir.Node]] = {}
    for node in changed:
        groups.setdefault(root(id(node)), []).append(node)
    return list(groups.values())


def _same_type(old: ir.Value, new: ir.Value) -> bool:
    """Same dtype, and the same rank and fixed sizes where both recorded a shape."""
    if old.dtype is not None and new.dtype is not None and old.dtype != new.dtype:
        return False
    if old.shape is None or new.shape is None:
        return True
    if len(old.shape) != len(new.shape):
        return False
    return all(not (isinstance(a, int) and isinstance(b, int)) or a == b for a, b in zip(old.shape, new.shape))


def _floating(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_floating_point()


def find_regions(original: ir.Model, rewritten: ir.Model, *, changed: list[ir.Node] | None = None, joined: frozenset[str] = frozenset()) -> list[Region]:
    """The changed regions of ``rewritten`` paired with what computes the same values in ``original``.

    ``changed``: the changed nodes (computed when not given); ``joined``: values not to compare
    where they are computed (a rewrite may give a name a new meaning, as merge does to a
    projection's output before its bias add): their readers join the region that computes them.
    A value the original lacks, or holds with another type or shape, is joined the same way.
    Raises :class:`CannotIsolate` when the model cannot be verified region by region."""
    _check_signature(original, rewritten)
    changed = list(changed_nodes(original, rewritten) if changed is None else changed)
    old_values, old_nodes = _values(original.graph), {n.name: n for n in original.graph}
    new_values = _values(rewritten.graph)
    outputs = {v.name for v in rewritten.graph.outputs}
    order = {id(n): i for graph in (original.graph, rewritten.graph) for i, n in enumerate(graph)}
    joined = set(joined)
    while True:
        grown = _grow(changed, joined, new_values, old_values, outputs)
        if not grown:
            break
        if len(joined) > MAX_JOINED:
            raise CannotIsolate(f"the rewrite changes the meaning of more than {MAX_JOINED} values unchanged nodes read (e.g. '{sorted(joined)[0]}')")
        changed = sorted({id(n): n for n in changed + grown}.values(), key=lambda n: order[id(n)])
    changed_ids = {id(n) for n in changed}
    comparable = {
        v.name for n in changed for v in n.outputs
        if v.name in old_values and _floating(v) and _same_type(old_values[v.name], v) and old_values[v.name].dtype is not None and v.shape is not None
    }
    groups = _components(changed, outputs, joined, comparable)
    boundaries = [_boundary(nodes, outputs) for nodes in groups]
    verified = {name for boundary in boundaries for name in boundary}
    return [_pair(index, nodes, boundary, verified, changed_ids, old_values, old_nodes, new_values, order) for index, (nodes, boundary) in enumerate(zip(groups, boundaries))]


#: at most this many values are joined into their readers' regions (else: the full check)
MAX_JOINED = 4096
#: a region that still differs after growing past this many nodes is a failure (a name given a new
#: meaning meets the original again within a node or two: a bias add, a cast, an attention)
MAX_REGION_NODES = 64


def _boundary(nodes, outputs: set[str]) -> list[str]:
    """What the region hands to nodes outside it or to the graph outputs: the values compared."""
    members = {id(n) for n in nodes}
    return [v.name for n in nodes for v in n.outputs if v.name and (v.name in outputs or any(id(user) not in members for user, _ in v.uses()))]


def _grow(changed, joined: set[str], new_values, old_values, outputs: set[str]) -> list:
    """Readers outside the region to add for the ``joined`` values and those that cannot be
    compared (missing in the original, another type or shape; added to ``joined``)."""
    ids = {id(n) for n in changed}
    grown = []
    for node in changed:
        for value in node.outputs:
            name = value.name
            if not any(id(user) not in ids for user, _ in value.uses()):
                continue
            if name not in joined and name in old_values and _same_type(old_values[name], new_values[name]):
                continue
            joined.add(name)
            grown.extend(user for user, _ in value.uses() if id(user) not in ids)
    return grown


def _pair(index, nodes, boundary, verified, changed_ids, old_values, old_nodes, new_values, order) -> Region:
    """One region: its changed nodes plus the integer context both sides compute, and the
    original nodes that compute ``boundary`` from the same fed values."""
    produced = {v.name for n in nodes for v in n.outputs}
    new_side, old_side = list(nodes), []
    inputs: list[str] = []
    context: set[int] = set()
    needs: dict[str, set[str]] = {}  # fed value -> the sides that read it ("new", "old")

    def feed(name: str, side: str) -> None:
        if name not in inputs:
            inputs.append(name)
        needs.setdefault(name, set()).update(("new", "old") if side == "both" else (side,))

    def resolve(name: str, side: str, todo_new: list) -> None:
        """A value the rewritten side reads from outside the changed nodes: a graph input or a
        float activation is fed; an integer value is computed on both sides by its producer."""
        if name in produced:
            return
        value = new_values[name]
        producer = value.producer()
        if value.dtype is None:
            raise CannotIsolate(f"value '{name}' has no recorded type")
        if producer is None or (_floating(value) and producer.op_type != "Constant"):
            if producer is not None and id(producer) in changed_ids and name not in verified:
                raise CannotIsolate(f"value '{name}' passes between two rewritten regions unverified")
            feed(name, side)
            return
        if id(producer) in changed_ids:
            raise CannotIsolate(f"the integer value '{name}' comes out of another rewritten region")
        if id(producer) in context:
            return
        context.add(id(producer))
        if len(context) > MAX_CONTEXT_NODES:
            raise CannotIsolate(f"the integer values '{name}' depends on reach too far back")
        new_side.append(producer)
        old_side.append(old_nodes[producer.name])
        todo_new.extend((v.name, "both") for v in producer.inputs if v is not None and not _is_constant(v))

    def shared(name: str) -> bool:
        """Computed by identical nodes in both graphs, or verified equal by a region, or a graph input."""
        value = new_values.get(name)
        if value is None or _is_constant(value):
            return False
        producer = value.producer()
        return producer is None or id(producer) not in changed_ids or (name in verified and name not in produced and _floating(value))

    todo_new = [(v.name, "new") for n in nodes for v in n.inputs if v is not None and not _is_constant(v)]
    todo_old = list(boundary)
    seen_old: set[str] = set()
    while todo_new or todo_old:
        while todo_new:
            resolve(*todo_new.pop(), todo_new)
        while todo_old:
            name = todo_old.pop()
            if name in inputs:
                needs[name].add("old")
                continue
            if name in seen_old:
                continue
            seen_old.add(name)
            value = old_values.get(name)
            if value is None:
                raise CannotIsolate(f"the original region reads '{name}', which the original graph does not hold")
            if _is_constant(value):
                continue
            if name not in boundary and shared(name):
                resolve(name, "old", todo_new)
                continue
            producer = value.producer()
            if producer is None:
                raise CannotIsolate(f"the original region reads graph input '{name}', which the rewritten model lacks")
            old_side.append(producer)
            todo_old.extend(v.name for v in producer.inputs if v is not None)
    _derive_one_sided(inputs, needs, new_side, old_side, new_values, old_nodes, changed_ids)
    new_side = sorted({id(n): n for n in new_side}.values(), key=lambda n: order[id(n)])
    old_side = sorted({id(n): n for n in old_side}.values(), key=lambda n: order[id(n)])
    weights = max(_weight_bytes(new_side), _weight_bytes(old_side))
    return Region(index, new_side, old_side, inputs, boundary, [n.name for n in nodes], weights)


#: a value one side alone reads is computed from the other side's fed values through at most this many unchanged nodes
MAX_DERIVED_NODES = 64


def _derive_one_sided(inputs: list[str], needs, new_side: list, old_side: list, new_values, old_nodes, changed_ids) -> None:
    """Fed values must be independent: a value only one side reads (the original's FFA lane
    ``t @ A`` beside the ``t`` the merged projection reads) is computed inside that side from the
    values the other side is fed (and graph inputs), through unchanged nodes, where that takes at
    most :data:`MAX_DERIVED_NODES` nodes and no more weight bytes than the region holds (1 MiB at
    least; the shortest derivation first); otherwise it stays fed (strip: the zeroed branch's input
    does not matter)."""
    graph_inputs = {name for name, value in new_values.items() if value.producer() is None and not _is_constant(value)}
    while True:
        best = None
        for name in inputs:
            sides = needs.get(name, set())
            if len(sides) != 1 or name in graph_inputs:
                continue
            side = next(iter(sides))
            other = {n for n in inputs if n != name and ("old" if side == "new" else "new") in needs.get(n, ())}
            derived = _derive(name, other | graph_inputs, new_values, changed_ids)
            if derived is not None and _weight_bytes(derived[0]) > max(1 << 20, _weight_bytes(new_side) + _weight_bytes(old_side)):
                derived = None  # not through an embedding table: a region stays the size of what it checks
            if derived is not None and (best is None or len(derived[0]) < len(best[2][0])):
                best = (name, side, derived)
        if best is None:
            return
        name, side, (nodes, reached) = best
        computed = {v.name for node in nodes for v in node.outputs}
        for done in [n for n in inputs if n == name or (n in computed and needs.get(n) == {side})]:  # computed now, no longer fed
            inputs.remove(done)
            needs.pop(done, None)
        for node in nodes:
            (new_side if side == "new" else old_side).append(node if side == "new" else old_nodes[node.name])
        for extra in reached:
            if extra not in inputs:
                inputs.append(extra)
            needs.setdefault(extra, set()).add(side)


def _derive(name: str, stops: set[str], new_values, changed_ids):
    """(unchanged nodes computing ``name`` from ``stops``, the stops reached), or None."""
    nodes, reached, seen, stack = [], [], set(), [name]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in stops and current != name:
            reached.append(current)
            continue
        value = new_values.get(current)
        if value is None:
            return None
        if _is_constant(value):
            continue
        producer = value.producer()
        if producer is None or id(producer) in changed_ids or len(nodes) >= MAX_DERIVED_NODES:
            return None
        nodes.append(producer)
        stack.extend(v.name for v in producer.inputs if v is not None)
    return nodes, reached


def _weight_bytes(nodes) -> int:
    seen = {v.name: v.const_value.nbytes for n in nodes for v in n.inputs if _is_constant(v) and v.const_value is not None}
    return sum(seen.values())


# ----------------------------------------------------------------------------- extraction


class RegionFiles:
    """Where region models are written, and the weights files they read: a region's external weights
    are referenced where they lie (offset and length in their file) and the files handed to ONNX
    Runtime memory-mapped (``add_external_initializers_from_files_in_memory``), so it reads each
    tensor once from the page cache instead of Python copying it through the model's bytes (three
    copies: half of a regional check's time at 1B). The maps live while a session is created."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.files: dict[str, str] = {}  # name in the region models -> real path
        self.count = 0
        self.reads: dict[Path, set[str]] = {}  # region model -> the files it reads

    def name(self, path: str | os.PathLike) -> str:
        real = os.path.realpath(path)
        for name, known in self.files.items():
            if known == real:
                return name
        name = f"weights{len(self.files)}.data"
        self.files[name] = real
        return name

    def write(self, proto: onnx.ModelProto) -> Path:
        self.count += 1
        path = self.directory / f"region{self.count}.onnx"
        path.write_bytes(proto.SerializeToString())
        self.reads[path] = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        return path

    def session(self, path: Path):
        """A CPU session of the region model at ``path``, its weights files mapped while it loads."""
        from zflora_compile.verify import session

        maps = {}
        try:
            for name in sorted(self.reads.pop(path)):
                with open(self.files[name], "rb") as handle:
                    maps[name] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            return session(path, in_memory=maps)
        finally:
            for mapped in maps.values():
                mapped.close()  # unmapped now: the pages read stop counting as this process's
            path.unlink()


def _initializer(value: ir.Value, files: RegionFiles | None) -> onnx.TensorProto:
    tensor = value.const_value
    if tensor is None:
        raise CannotIsolate(f"initializer '{value.name}' has no value")
    proto = onnx.TensorProto(name=value.name, data_type=tensor.dtype.value, dims=[int(d) for d in tensor.shape])
    if files is not None and isinstance(tensor, ir.ExternalTensor) and tensor.nbytes >= REFERENCED_BYTES and os.path.isfile(tensor.path):
        proto.data_location = onnx.TensorProto.EXTERNAL
        where = {"location": files.name(tensor.path), "offset": str(tensor.offset or 0), "length": str(tensor.length if tensor.length is not None else tensor.nbytes)}
        for key, text in where.items():
            proto.external_data.add(key=key, value=text)
        return proto
    proto.raw_data = tensor.tobytes()
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return proto


def region_model(model: ir.Model, nodes: list, inputs: list[str], outputs: list[str], values: dict[str, ir.Value], files: RegionFiles | None = None) -> bytes | Path:
    """The ONNX model of ``nodes`` alone: ``inputs`` as graph inputs, ``outputs`` as outputs, and
    only the initializers the nodes read. With ``files``, written there (external weights
    referenced in their files) and its path returned; else serialised, every weight copied in."""
    graph = onnx.GraphProto(name="region")
    fed = set(inputs)
    graph.node.extend(ir.serde.serialize_node(node) for node in nodes)
    seen = set()
    for node in nodes:
        for value in node.inputs:
            if not _is_constant(value) or value.name in seen or value.name in fed:
                continue
            seen.add(value.name)
            graph.initializer.append(_initializer(value, files))
    for name in inputs:
        graph.input.append(onnx.helper.make_tensor_value_info(name, values[name].dtype.value, None))
    for name in outputs:
        graph.output.append(onnx.helper.make_tensor_value_info(name, values[name].dtype.value, None))
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    return files.write(proto) if files is not None else proto.SerializeToString()


# ----------------------------------------------------------------------------- activations


def case_symbols(specs, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """The size of every symbolic axis of the graph inputs in one case's feeds."""
    symbols = {}
    for spec in specs:
        if spec.name in feeds:
            for dim, size in zip(spec.shape, feeds[spec.name].shape):
                if isinstance(dim, str):
                    symbols.setdefault(dim, int(size))
    return symbols


def concrete_shape(value: ir.Value, symbols: dict[str, int]) -> list[int]:
    """``value``'s recorded shape with the case's axis sizes; :class:`CannotIsolate` when a size is unknown."""
    if value.shape is None:
        raise CannotIsolate(f"value '{value.name}' has no recorded shape")
    dims = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
            continue
        text = dim.value if isinstance(dim, ir.SymbolicDim) else None
        size = _evaluate(text, symbols) if text else None
        if size is None:
            raise CannotIsolate(f"value '{value.name}' has an axis of unknown size ({text or '?'})")
        dims.append(size)
    return dims


def _evaluate(text: str, symbols: dict[str, int]) -> int | None:
    if text in symbols:
        return symbols[text]
    tokens = re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[+\-*]", text)
    if len(tokens) > 1 and all(t in symbols or t.isdigit() or t in "+-*" for t in tokens):
        try:
            return int(eval(" ".join(str(symbols.get(t, t)) for t in tokens), {"__builtins__": {}}))  # noqa: S307 - names and digits only
        except SyntaxError:
            return None
    return None


def activation(value: ir.Value, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """A seeded float activation: standard normal, the scale of a normed hidden state."""
    return rng.standard_normal(shape).astype(value.dtype.numpy())


# ----------------------------------------------------------------------------- the check


class _Signature:
    """What :func:`~zflora_compile.verify.make_cases` reads of a session, from the input specs."""

    def __init__(self, specs):
        self.specs = specs

    def get_inputs(self):
        return self.specs

    def get_overridable_initializers(self):
        return []


@dataclasses.dataclass
class _Context:
    original: ir.Model
    rewritten: ir.Model
    specs: list
    cases: list
    lookup: dict
    computed_in: object
    atol: float | None
    rtol: float | None
    seed: int
    files: RegionFiles | None = None


def _session(model: bytes | Path, files: RegionFiles | None):
    from zflora_compile.verify import session

    return session(model) if files is None else files.session(model)


def _check(region: Region, ctx: _Context) -> dict:
    """Both sides of ``region`` in ONNX Runtime on every case (the sessions released on return):
    ``cases`` (name, fed shapes, outputs compared or None, skipped reason), ``failing`` values."""
    from zflora_compile.verify import compare, tolerance_for

    try:
        reference = _session(region_model(ctx.original, region.original, region.inputs, region.outputs, ctx.lookup, ctx.files), ctx.files)
    except Exception as error:  # noqa: BLE001
        raise CannotIsolate(f"{region.name}: the original region does not load alone ({first_line(error)})") from None
    try:
        candidate, problem = _session(region_model(ctx.rewritten, region.rewritten, region.inputs, region.outputs, ctx.lookup, ctx.files), ctx.files), None
    except Exception as error:  # noqa: BLE001
        candidate, problem = None, f"the rewritten region does not load: {first_line(error)}"
    stable = zlib.crc32(region.changed[0].encode())
    done, failing = [], []
    for number, case in enumerate(ctx.cases):
        rng = np.random.default_rng([ctx.seed, stable, number])
        symbols = case_symbols(ctx.specs, case.feeds)
        feeds = {n: case.feeds[n] if n in case.feeds else activation(ctx.lookup[n], concrete_shape(ctx.lookup[n], symbols), rng) for n in region.inputs}
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        try:
            expected = reference.run(region.outputs, feeds)
        except Exception as error:  # noqa: BLE001
            if case.optional:
                done.append((case.name, shapes, None, f"the original region does not run on it: {first_line(error)}"))
                continue
            raise CannotIsolate(f"{region.name}: the original region does not run on synthesized activations ({case.name}: {first_line(error)})") from None
        actual = None
        if candidate is not None:
            try:
                actual = candidate.run(region.outputs, feeds)
            except Exception as error:  # noqa: BLE001
                problem = f"the rewritten region does not run: {first_line(error)}"
        outputs = {}
        if actual is None:
            outputs[region.outputs[0]] = {"passed": False, "reason": problem}
        else:
            for name, ref, got in zip(region.outputs, expected, actual):
                outputs[name] = compare(ref, got, *tolerance_for(ctx.computed_in if ref.dtype == np.float64 and ctx.computed_in is not None else ref.dtype, ctx.atol, ctx.rtol))
        failing += [name for name, outcome in outputs.items() if not outcome["passed"] and name not in failing]
        done.append((case.name, shapes, outputs, None))
    return {"cases": done, "failing": failing}


def verify_regions(
    original: ir.Model, rewritten: ir.Model, signature_path, rewritten_path, vocab, *, atol=None, rtol=None, seed: int = 0, progress=None, max_region_share: float | None = None
) -> dict:
    """Each changed region of ``rewritten`` against ``original``'s nodes computing the same values,
    on every case :func:`~zflora_compile.verify.make_cases` builds from ``signature_path``'s inputs
    (the file ``original`` was read from), one region's two sessions at a time.

    A value that differs where a region hands it on may only have a new meaning under its old name
    (merge folds the adapter into a projection whose output a bias add reads before the adapter's
    add): its readers join the region and it is checked again, until the values agree or the
    difference reaches a graph output (a failure). Returns the report's verification section
    (``regions``: what each region compared; ``cases``: one entry per region and case). Raises
    :class:`CannotIsolate` to ask for the full check."""
    import onnxruntime as ort

    from zflora_compile.progress import NullProgress
    from zflora_compile.verify import input_specs, make_cases, verification_section, weight_precision

    changed = changed_nodes(original, rewritten)
    specs = input_specs(signature_path)
    ctx = _Context(original, rewritten, specs, make_cases(_Signature(specs), vocab, seed=seed), {**_values(original.graph), **_values(rewritten.graph)},
                   weight_precision(rewritten_path), atol, rtol, seed)
    with tempfile.TemporaryDirectory(prefix="zflora-regions-") as tmp:
        # an ONNX Runtime whose Python API lacks in-memory external files gets the weights copied in
        ctx.files = RegionFiles(tmp) if hasattr(ort.SessionOptions, "add_external_initializers_from_files_in_memory") else None
        graph_outputs = {v.name for v in rewritten.graph.outputs}
        checked: dict[tuple, dict] = {}
        joined: set[str] = set()
        regions = find_regions(original, rewritten, changed=changed)
        if max_region_share is not None and regions:
            _refuse_large_regions(regions, rewritten, max_region_share)
        with (progress or NullProgress()).bar(f"verify {len(regions)} region(s)", len(regions)) as advance:
            while True:
                for region in regions:
                    key = tuple(region.changed)
                    if key not in checked:
                        checked[key] = _check(region, ctx)
                        advance()
                handed = {name for region in regions for name in region.outputs}
                differing = {name for region in regions for name in checked[tuple(region.changed)]["failing"]}
                grow = set()
                for region in regions:
                    outcome = checked[tuple(region.changed)]
                    fed = (set(region.inputs) & handed) - joined
                    if not outcome["failing"] or fed & differing or len(region.changed) > MAX_REGION_NODES:
                        continue  # passed; fed a differing value (decided once its source is); grown too far: a failure
                    # where a difference starts, its readers join the region (a name given a new meaning meets
                    # the original again a node or two on); one that reaches only graph outputs joins the regions
                    # feeding it (strip hands the base on under the adapted output's name)
                    grow |= {name for name in outcome["failing"] if name not in graph_outputs and name not in joined} or fed
                if not grow or len(joined | grow) > MAX_JOINED:
                    break
                joined |= grow
                regions = find_regions(original, rewritten, changed=changed, joined=frozenset(joined))
    results, summaries = [], []
    worst = {"output": None, "max_abs_diff": -1.0}
    for region in regions:
        outcome = checked[tuple(region.changed)]
        for name, shapes, outputs, skipped in outcome["cases"]:
            label = f"region {region.index}: {name}"
            entry = {"case": label, "region": region.index, "inputs": shapes, "outputs": outputs or {}}
            if skipped:
                entry["skipped"] = skipped
            results.append(entry)
            for value, compared in (outputs or {}).items():
                if compared.get("max_abs_diff", float("inf")) > worst["max_abs_diff"]:
                    worst = {"output": value, "case": label, "region": region.index, "max_abs_diff": compared.get("max_abs_diff", float("inf"))}
        summaries.append({**region.to_json(), "passed": not outcome["failing"]})
    section = verification_section(f"onnxruntime {ort.__version__} CPUExecutionProvider", results, worst, seed=seed, atol=atol, rtol=rtol)
    section["rule"] = "|rewritten - original| <= atol + rtol * |original|, elementwise, every value a rewritten region hands to unchanged nodes or the graph outputs"
    section["regions"] = summaries
    section["region_checks"] = len(checked)
    if joined:
        section["joined"] = sorted(joined)
    return section


def _refuse_large_regions(regions: list[Region], rewritten: ir.Model, share: float) -> None:
    """:class:`CannotIsolate` when a region holds more than ``share`` of the model's weight bytes:
    checking it alone would hold about as much as checking the model whole."""
    total = sum(v.const_value.nbytes for v in rewritten.graph.initializers.values() if v.const_value is not None) or 1
    largest = max(regions, key=lambda r: r.weight_bytes)
    if largest.weight_bytes > share * total:
        raise CannotIsolate(f"{largest.name} holds {largest.weight_bytes / total:.0%} of the weights ({len(largest.changed)} changed nodes): as large as the model")


def failure_message(section: dict) -> str:
    """The first mismatch, naming its region, value and case."""
    names = {r["region"]: r for r in section.get("regions", [])}
    for case in section["cases"]:
        for name, outcome in case["outputs"].items():
            if not outcome["passed"]:
                region = names.get(case.get("region"), {})
                changed = region.get("changed_nodes", [])
                shown = ", ".join(repr(n) for n in changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
                detail = outcome.get("reason") or f"max abs diff {outcome['max_abs_diff']:.3g} > atol {outcome['atol']:g} + rtol {outcome['rtol']:g} * |ref|"
                return f"verification failed in region {case.get('region')} (rewritten node(s) {shown}): value '{name}' ({case['case']}): {detail}"
    return "verification failed"
