"""What an HLO module does per step, read from its text: matmul FLOPs, memory traffic, collectives.

XLA's own `cost_analysis()` counts the body of a `while` loop once, and `nn.scan`
over layers is a while loop, so for a scanned model it misses (L - 1) / L of the
layer work. Here every computation is weighted by how many times it runs: the
product of the trip counts of the loops around it (read from the loop's
`known_trip_count`, else from the integer bound its condition compares against).

- `matmul_flops(text)`: 2 * |result| * |contracted| for every `dot`, times its
  computation's count. Used on the unpartitioned, unoptimised HLO of the step
  (`Lowered.as_text("hlo")`), where every dot is still a `dot` (TPU compilers turn
  them into convolutions) and remat's recomputation is explicit.
- `memory_bytes(text)`: operands + results of every top-level instruction (a fusion
  counts as one), times its count: XLA's own HBM-traffic model, loop-corrected.
- `collectives(text)`: every all-gather / reduce-scatter / all-reduce / all-to-all /
  collective-permute of a compiled (partitioned) module, with its replica groups.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from typing import Iterator

import numpy as np

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SHAPE_WITH_LAYOUT = re.compile(r"\b[a-z][0-9a-z]*\[[\d,]*\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEES = re.compile(r"\b(condition|body|calls|to_apply|branch_computations|true_computation|false_computation)="
                      r"(\{[^}]*\}|%?[\w.\-]+)")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Instructions that move no data of their own (their callees, if any, are counted instead).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "optimization-barrier", "copy-done",
         "async-start", "async-update", "async-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
         "send-done", "recv-done", "add-dependency", "domain"}


def array_bytes(shape_text: str) -> float:
    """Bytes of every array in a shape (a tuple's elements summed); tokens and opaque types are 0."""
    return sum(_BYTES.get(dt, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _ARRAY.findall(shape_text))


def array_dims(shape_text: str) -> list[int]:
    """The dimensions of the first array in a shape."""
    m = _ARRAY.search(shape_text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result shape text
    opcode: str
    operands: list[str]
    attrs: str  # everything after the operand list


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]

    def shapes(self) -> dict[str, str]:
        return {i.name: i.shape for i in self.instrs}


def _close(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    """Index of the bracket closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i
    return len(text)


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    name, rest = m.group(2), m.group(3)
    if rest.startswith("("):  # a tuple shape
        end = _close(rest, 0) + 1
    else:
        end = rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _close(rest, op.end() - 1)
    # Operands may be printed with their shapes ("f32[4]{0} %x"): drop the shapes, keep the names.
    inside = _SHAPE_WITH_LAYOUT.sub("", rest[op.end():close])
    operands = [piece.split()[-1].lstrip("%") for piece in inside.split(",") if piece.split()]
    return Instr(name, shape, op.group(1), operands, rest[close + 1:])


def parse(text: str) -> tuple[dict[str, Computation], str]:
    """The computations of an HLO module's text, and the entry computation's name."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and not line.startswith(("HloModule", " ")):
                current = Computation(m.group(2), [])
                if m.group(1):
                    entry = current.name
            continue
        if line.strip() == "}":
            comps[current.name] = current
            current = None
            continue
        instr = _parse_instr(line)
        if instr is not None:
            current.instrs.append(instr)
    if not entry and comps:
        entry = list(comps)[-1]
    return comps, entry


def _callees(instr: Instr) -> Iterator[tuple[str, str]]:
    for kind, value in _CALLEES.findall(instr.attrs):
        for name in re.findall(r"%?([\w.\-]+)", value):
            yield kind, name


def trip_count(instr: Instr, comps: dict[str, Computation]) -> int | None:
    """Iterations of a while loop: its known_trip_count, else the integer bound its condition compares with."""
    m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', instr.attrs)
    if m:
        return int(m.group(1))
    cond = dict(_callees(instr)).get("condition")
    if cond not in comps:
        return None
    bounds = [int(i.operands[0]) for i in comps[cond].instrs
              if i.opcode == "constant" and re.match(r"[su](32|64)\[\]", i.shape)
              and len(i.operands) == 1 and re.fullmatch(r"-?\d+", i.operands[0])]
    # jax's scans and fori_loops count from 0 upwards while `i < bound`: the bound is the trip count.
    return bounds[0] if len(bounds) == 1 and bounds[0] >= 0 else None


def multiplicities(comps: dict[str, Computation], entry: str) -> tuple[dict[str, float], set[str], list[str]]:
    """How many times each computation runs per call of `entry`; the fusion/reducer bodies; unknown loops."""
    edges: dict[str, list[tuple[str, float]]] = defaultdict(list)
    inner: set[str] = set()  # fusion bodies and reducers: not top-level instructions
    unknown: list[str] = []
    for comp in comps.values():
        for instr in comp.instrs:
            trips = None
            if instr.opcode == "while":
                trips = trip_count(instr, comps)
                if trips is None:
                    unknown.append(instr.name)
            for kind, callee in _callees(instr):
                factor = float(trips if trips is not None else 1) if kind in ("body", "condition") else 1.0
                if kind == "condition" and trips is not None:
                    factor = trips + 1.0
                edges[comp.name].append((callee, factor))
                if kind == "to_apply" and instr.opcode not in ("call",) or instr.opcode == "fusion":
                    inner.add(callee)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:  # iterative DFS post-order (deep call graphs overflow recursion)
        stack = [(name, iter(edges.get(name, ())))]
        seen.add(name)
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                order.append(node)
                stack.pop()
            elif nxt[0] not in seen and nxt[0] in comps:
                seen.add(nxt[0])
                stack.append((nxt[0], iter(edges.get(nxt[0], ()))))

    visit(entry)
    mult: dict[str, float] = defaultdict(float)
    mult[entry] = 1.0
    for name in reversed(order):  # callers before callees
        for callee, factor in edges.get(name, ()):
            mult[callee] += mult[name] * factor
    return dict(mult), inner, unknown


def weighted_instructions(comps: dict[str, Computation], mult: dict[str, float],
                          skip: set[str] = frozenset()) -> Iterator[tuple[float, Instr, dict[str, str]]]:
    """(times executed, instruction, its computation's shapes) of every instruction in a computation that runs,
    except those in `skip`."""
    for comp in comps.values():
        m = mult.get(comp.name, 0.0)
        if not m or comp.name in skip:
            continue
        shapes = comp.shapes()
        for instr in comp.instrs:
            yield m, instr, shapes


def matmul_flops(text: str) -> tuple[float, list[str]]:
    """FLOPs of every dot, loop-weighted; and the while loops whose trip count could not be read."""
    comps, entry = parse(text)
    mult, _, unknown = multiplicities(comps, entry)
    total = 0.0
    for m, instr, shapes in weighted_instructions(comps, mult):
        if instr.opcode != "dot":
            continue
        lhs = array_dims(shapes.get(instr.operands[0], ""))
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
        k = math.prod(lhs[int(d)] for d in contract.group(1).split(",") if d) if contract and lhs else 1
        total += m * 2.0 * math.prod(array_dims(instr.shape)) * k
    return total, unknown


_SLICING = ("dynamic-slice", "slice", "gather")


def _instr_bytes(instr: Instr, shapes: dict[str, str], comps: dict[str, Computation]) -> float:
    """Bytes one top-level instruction reads and writes, as XLA's cost model sees them.

    A slice reads only what it returns, and a dynamic-update-slice writes its update in place:
    in a scanned loop that distinction is the whole stacked [L, ...] array against one layer
    of it. A fusion is charged per parameter the same way, by what its body does with it.
    """
    if instr.opcode in _SLICING:
        return 2 * array_bytes(instr.shape)
    if instr.opcode == "dynamic-update-slice":
        return 2 * array_bytes(shapes.get(instr.operands[1], "")) if len(instr.operands) > 1 else 0.0
    body = dict(_callees(instr)).get("calls") if instr.opcode == "fusion" else None
    if body not in comps:
        return array_bytes(instr.shape) + sum(array_bytes(shapes.get(o, "")) for o in instr.operands)
    fused = comps[body]
    total = sum(_param_read_bytes(fused, k, array_bytes(shapes.get(o, "")), comps)
                for k, o in enumerate(instr.operands))
    by_name = {i.name: i for i in fused.instrs}
    inner_shapes = fused.shapes()
    root = fused.instrs[-1] if fused.instrs else None
    outputs = [by_name.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
    for out in outputs:
        if out is not None and out.opcode == "dynamic-update-slice" and len(out.operands) > 1:
            total += array_bytes(inner_shapes.get(out.operands[1], ""))  # written in place
        elif out is not None:
            total += array_bytes(out.shape)
    return total


def _param_read_bytes(fused: Computation, index: int, full: float, comps: dict[str, Computation],
                      depth: int = 0) -> float:
    """Bytes a fusion body reads of its parameter `index`: slices only read what they take (recursively
    through nested fusions), a buffer updated in place is not read; anything else reads it all."""
    name = next((i.name for i in fused.instrs if i.opcode == "parameter" and i.operands == [str(index)]), None)
    if name is None or depth > 8:
        return full
    total = 0.0
    for user in (i for i in fused.instrs if name in i.operands):
        if user.opcode in _SLICING and user.operands[0] == name:
            total += array_bytes(user.shape)
        elif user.opcode == "dynamic-update-slice" and user.operands[0] == name:
            continue
        elif user.opcode == "fusion" and dict(_callees(user)).get("calls") in comps:
            callee = comps[dict(_callees(user)).get("calls")]
            total += sum(_param_read_bytes(callee, k, full, comps, depth + 1)
                         for k, o in enumerate(user.operands) if o == name)
        else:
            return full
    return min(total, full)


def memory_bytes(text: str, loops: bool = True) -> float:
    """Bytes read and written by the top-level instructions (fusions as one), loop-weighted unless `loops` is False."""
    comps, entry = parse(text)
    mult, inner, _ = multiplicities(comps, entry)
    total = 0.0
    for m, instr, shapes in weighted_instructions(comps, mult, skip=inner):
        if instr.opcode not in _FREE:
            total += (m if loops else 1.0) * _instr_bytes(instr, shapes, comps)
    return total


# ----------------------------------------------------------------------------- collectives


@dataclasses.dataclass
class Collective:
    kind: str  # one of COLLECTIVES
    name: str
    operand_bytes: float  # per device, per execution
    group: list[int]  # the logical device ids of one replica group (collective-permute: every id it touches)
    pairs: list[tuple[int, int]]  # collective-permute's source -> target pairs
    count: float  # executions per step (loop-weighted)

    @property
    def group_size(self) -> int:
        return max(len(self.group), 1)

    def wire_bytes(self) -> float:
        """Bytes each device sends per execution with ring algorithms (arXiv:1909.08053 App.; NCCL docs)."""
        n, s = self.group_size, self.operand_bytes
        if self.kind == "collective-permute":
            return s
        if n <= 1:
            return 0.0
        return {"all-gather": s * (n - 1), "reduce-scatter": s * (n - 1) / n, "all-reduce": 2 * s * (n - 1) / n,
                "all-to-all": s * (n - 1) / n}[self.kind]


def _iota_groups(dims: list[int], reshape: list[int], perm: list[int] | None) -> np.ndarray:
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    if perm is not None:
        ids = ids.transpose(perm)
    return ids.reshape(dims)


def replica_group(attrs: str) -> list[int] | None:
    """The first replica group's logical device ids, from any of XLA's printed forms."""
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return [int(x) for x in m.group(1).split(",") if x]
    if re.search(r"replica_groups=\{\}", attrs):
        return []
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:  # iota form: [groups, size] <= [reshape] T(perm)
        dims, reshape = [int(x) for x in m.group(1).split(",")], [int(x) for x in m.group(2).split(",")]
        perm = [int(x) for x in m.group(3).split(",")] if m.group(3) else None
        return _iota_groups([dims[0], -1], reshape, perm)[0].tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                  r"\s*\{([^}]*)\}", attrs)
    if m:  # mesh-axes form: mesh['a'=4,'b'=2], device_ids=([..]T(..)) {'a'}: a group spans the named axes
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        if not axes or ":" in m.group(1) or ":" in m.group(4):
            return None  # sub-axes: not parsed
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        reshape = [int(x) for x in m.group(2).split(",")] if m.group(2) else sizes
        perm = [int(x) for x in m.group(3).split(",")] if m.group(3) else None
        ids = _iota_groups(sizes, reshape, perm)
        grouped = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4))]
        index = tuple(slice(None) if i in grouped else 0 for i in range(len(names)))
        return ids[index].reshape(-1).tolist()
    return None


def collectives(text: str) -> tuple[list[Collective], list[str]]:
    """Every collective of a compiled module, loop-weighted; and the names whose groups could not be read."""
    comps, entry = parse(text)
    mult, _, _ = multiplicities(comps, entry)
    out: list[Collective] = []
    unread: list[str] = []
    for m, instr, shapes in weighted_instructions(comps, mult):
        kind = instr.opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        size = sum(array_bytes(shapes.get(o, "")) for o in instr.operands)
        pairs: list[tuple[int, int]] = []
        if kind == "collective-permute":
            pm = re.search(r"source_target_pairs=\{(.*?)\}\}", instr.attrs)
            pairs = [(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)", pm.group(1) + "}")] if pm else []
            group = sorted({i for p in pairs for i in p})
        else:
            group = replica_group(instr.attrs)
            if group is None:
                unread.append(instr.name)
                group = []
        out.append(Collective(kind, instr.name, size, group, pairs, m))
    return out, unread


def cost_analysis_dict(cost: object) -> dict[str, float]:
    """`Compiled.cost_analysis()` as one dict (older jax returned a list with one dict per module)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return {k: float(v) for k, v in dict(cost or {}).items() if isinstance(v, (int, float))}


def summary_json(items: list[Collective]) -> str:
    """A compact, stable rendering for debugging and tests."""
    return json.dumps([dataclasses.asdict(c) for c in items], sort_keys=True)
