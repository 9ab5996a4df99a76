"""Small composable helpers for an experiment's `sweep()`: each returns a list of dotted-key override dicts.

    from train.sweep_space import one_at_a_time, product, zipped

    def sweep(arg=None):
        # a learning-rate grid for each of two widths (each width with its own head count)
        return product({"optimizer.lr": [1e-3, 3e-3, 1e-2]},
                       zipped({"model.d_model": [64, 128], "model.n_heads": [2, 4]}))

A factor is either a mapping `{key: [values]}` (the cartesian product of its
keys) or a list of override dicts (e.g. another helper's result). Seeds are a
sweep axis of the runner (`herd sweep --seeds=3`), not of the points.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

Point = dict[str, Any]
Factor = Union[Mapping[str, Sequence[Any]], Iterable[Mapping[str, Any]]]


def _points(factor: Factor) -> list[Point]:
    if isinstance(factor, Mapping):
        for key, values in factor.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(f"sweep axis {key!r} needs a list of values, got {values!r}")
            if not values:
                raise ValueError(f"sweep axis {key!r} has no values")
        keys = list(factor)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(factor[k] for k in keys))]
    return [dict(p) for p in factor]


def product(*factors: Factor) -> list[Point]:
    """Every combination of one point from each factor (later factors vary fastest)."""
    out: list[Point] = [{}]
    for factor in factors:
        points = _points(factor)
        for a in out:
            for b in points:
                shared = sorted(set(a) & set(b))
                if shared:
                    raise ValueError(f"sweep factors both set {shared[0]!r}; each key belongs to one factor")
        out = [{**a, **b} for a in out for b in points]
    return out


def zipped(axes: Mapping[str, Sequence[Any]]) -> list[Point]:
    """The i-th values of every key together: `zipped({"a": [1, 2], "b": [3, 4]})` -> a=1,b=3 and a=2,b=4."""
    lengths = {key: len(values) for key, values in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zipped sweep axes need equal lengths, got {lengths}")
    keys = list(axes)
    return [dict(zip(keys, values)) for values in zip(*(axes[k] for k in keys))]


def one_at_a_time(axes: Mapping[str, Sequence[Any]], baseline: Mapping[str, Any] | None = None) -> list[Point]:
    """The ablation shape: the baseline (`{}`, the experiment itself), then each value of each key alone.

    A value equal to `baseline[key]` (the experiment's own value, when given) is
    skipped, since that point would be the baseline again.
    """
    baseline = baseline or {}
    out: list[Point] = [{}]
    for key, values in axes.items():
        out += [{key: v} for v in values if not (key in baseline and baseline[key] == v)]
    return out


def chain(*sweeps: Iterable[Mapping[str, Any]]) -> list[Point]:
    """The points of several sweeps, one after the other."""
    return [dict(p) for sweep in sweeps for p in sweep]
