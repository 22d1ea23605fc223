"""Key mapping between PyTorch state dicts and Flax parameter trees.

A component's mapping is a `KeyMap`: an ordered table of `Rule`s, each pairing a PyTorch key
pattern with a Flax path pattern and naming the transform between the two layouts. Patterns hold
`{name}` placeholders that match decimal indices, so one rule covers every block of a stack:

    Rule("blocks.{i}.attn.qkv.weight", "blocks_{i}/attn/qkv/kernel", "linear")

`torch_to_flax` walks a state dict through the table and checks the result against the target
param shapes (from `jax.eval_shape` of the model's init, so nothing is allocated); every problem
(a key no rule maps, a param nothing fills, a shape that disagrees) is collected and raised once,
in a `ConversionError` that keeps them all (`.problems`) and shows the first few in one line.
`flax_to_torch` is the exact inverse: each transform is a pure transpose, so a round trip
reproduces the state dict bit for bit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Array = Any  # numpy array (or anything np.asarray accepts)


class ConversionError(ValueError):
    """Every problem found while mapping a checkpoint, kept in `.problems`.

    The message is one line: the count, the likely cause when the problems point one way (a
    checkpoint of other sizes, or of another model/layout: `likely_cause`), the first `SHOWN`
    problems.
    """

    SHOWN = 5

    def __init__(self, problems: list[str], what: str = "checkpoint"):
        self.problems = list(problems)
        shown = self.problems[:self.SHOWN]
        if len(self.problems) > len(shown):
            shown.append(f"... and {len(self.problems) - len(shown)} more")
        cause = likely_cause(self.problems)
        cause = f" [{cause}]" if cause else ""
        super().__init__(f"{len(self.problems)} problem(s) converting the {what}{cause}: " + "; ".join(shown))


def likely_cause(problems: list[str]) -> str | None:
    """What a `ConversionError`'s problems point to, when they point one way: of at least 3, most
    are shape mismatches, missing params or unmapped keys, and the shape mismatches (with keys
    beyond the model's layers) outnumber the keys no rule maps, or the other way round."""
    if len(problems) < 3:
        return None
    sizes = sum(p.startswith("shape mismatch") or "which the model does not have" in p for p in problems)
    layout = sum(p.startswith("unmapped source key") for p in problems)
    missing = sum(p.startswith("missing param") for p in problems)
    if 2 * (sizes + layout + missing) <= len(problems) or sizes == layout:
        return None
    if sizes > layout:
        return ("shapes differ: the checkpoint was made for other model sizes; use the config that "
                "matches it, e.g. --config unipic_1p5b or a fixture folder")
    return "keys no rule maps: the checkpoint is of another model, or its keys carry another prefix"


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change between the PyTorch tensor and the Flax param (and its inverse)."""

    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _same(x):
    return x


TRANSFORMS: dict[str, Transform] = {
    # Parameters stored the same way on both sides (biases, norms, embeddings, free tensors).
    "copy": Transform(_same, _same),
    # nn.Linear.weight (out, in) <-> Dense.kernel (in, out).
    "linear": Transform(lambda w: w.T, lambda w: w.T),
    # nn.Conv2d.weight (O, I, kh, kw) <-> Conv.kernel (kh, kw, I, O).
    "conv": Transform(lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
}

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(pattern: str) -> re.Pattern:
    """'a.{i}.b' -> regex with a named decimal group per placeholder; literal text escaped."""
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>[0-9]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a key table: PyTorch key pattern, Flax path pattern ('/'-separated), transform."""

    torch: str
    flax: str
    transform: str = "copy"

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r} in rule for {self.torch!r}")
        if set(_PLACEHOLDER.findall(self.torch)) != set(_PLACEHOLDER.findall(self.flax)):
            raise ValueError(f"rule {self.torch!r} -> {self.flax!r}: placeholders differ")

    def prefixed(self, torch_prefix: str, flax_prefix: str) -> "Rule":
        return Rule(torch_prefix + self.torch, flax_prefix + self.flax, self.transform)


class KeyMap:
    """An ordered table of rules, plus tied PyTorch keys (alias -> canonical key).

    A tied alias (Qwen2's `lm_head.weight`, say) is checked equal to its canonical key on import and
    written back on export; it has no Flax param of its own.
    """

    def __init__(self, rules: Iterable[Rule], tied: Mapping[str, str] | None = None):
        self.rules = tuple(rules)
        self.tied = dict(tied or {})
        self._fwd = [(_compile(r.torch), r) for r in self.rules]
        self._inv = [(_compile(r.flax), r) for r in self.rules]

    def prefixed(self, torch_prefix: str, flax_prefix: str) -> "KeyMap":
        """The same table under a parent module ('vae.' / 'vae/' for UniPic's VAE)."""
        return KeyMap(
            [r.prefixed(torch_prefix, flax_prefix) for r in self.rules],
            {torch_prefix + a: torch_prefix + c for a, c in self.tied.items()},
        )

    def __add__(self, other: "KeyMap") -> "KeyMap":
        return KeyMap(self.rules + other.rules, {**self.tied, **other.tied})

    def to_flax(self, torch_key: str) -> tuple[str, Rule] | None:
        for rx, rule in self._fwd:
            m = rx.match(torch_key)
            if m:
                return rule.flax.format(**m.groupdict()), rule
        return None

    def to_torch(self, flax_path: str) -> tuple[str, Rule] | None:
        for rx, rule in self._inv:
            m = rx.match(flax_path)
            if m:
                return rule.torch.format(**m.groupdict()), rule
        return None


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{'a/b/c': leaf} -> nested dict."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def torch_to_flax(
    state_dict: Mapping[str, Array],
    keymap: KeyMap,
    target: Mapping | None = None,
    *,
    what: str = "checkpoint",
    skip: Callable[[str], bool] | None = None,
) -> dict:
    """Map a PyTorch state dict to a nested Flax param dict.

    `target` is the expected param tree (arrays or `jax.ShapeDtypeStruct`s, e.g. the 'params' entry
    of `jax.eval_shape(model.init, ...)`); when given, every target param must be filled with the
    right shape. `skip(key)` drops source keys on purpose (e.g. another component's prefix).
    Arrays keep their dtype, so the mapping is lossless. Raises `ConversionError` listing every
    unmapped key, missing param and shape mismatch.
    """
    problems: list[str] = []
    flat: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    want = flatten(target) if target is not None else None
    for key, value in state_dict.items():
        if skip is not None and skip(key):
            continue
        if key in keymap.tied:
            canon = keymap.tied[key]
            if canon not in state_dict:
                problems.append(f"tied key {key!r}: its canonical key {canon!r} is missing")
            elif not np.array_equal(np.asarray(value), np.asarray(state_dict[canon])):
                problems.append(f"tied key {key!r} differs from {canon!r}")
            continue
        hit = keymap.to_flax(key)
        if hit is None:
            problems.append(f"unmapped source key {key!r} {tuple(np.shape(value))}")
            continue
        path, rule = hit
        if path in origin:
            problems.append(f"source keys {origin[path]!r} and {key!r} both map to {path!r}")
            continue
        arr = TRANSFORMS[rule.transform].to_flax(np.asarray(value))
        if want is not None:
            if path not in want:
                problems.append(f"source key {key!r} maps to {path!r}, which the model does not have")
                continue
            if tuple(arr.shape) != tuple(want[path].shape):
                origin[path] = key  # reported here, not again as missing
                problems.append(
                    f"shape mismatch for {key!r} -> {path!r}: checkpoint gives {tuple(arr.shape)}, "
                    f"model wants {tuple(want[path].shape)}"
                )
                continue
        flat[path] = arr
        origin[path] = key
    if want is not None:
        for path, leaf in want.items():
            if path not in origin:
                back = keymap.to_torch(path)
                src = f" (source key {back[0]!r})" if back else ""
                problems.append(f"missing param {path!r} {tuple(leaf.shape)}{src}")
    if problems:
        raise ConversionError(problems, what)
    return unflatten(flat)


def flax_to_torch(params: Mapping, keymap: KeyMap, *, what: str = "params") -> dict[str, np.ndarray]:
    """Inverse of `torch_to_flax`: nested Flax params -> PyTorch-layout state dict (numpy)."""
    problems, out = [], {}
    for path, leaf in flatten(params).items():
        hit = keymap.to_torch(path)
        if hit is None:
            problems.append(f"param {path!r} has no PyTorch key")
            continue
        key, rule = hit
        out[key] = np.ascontiguousarray(TRANSFORMS[rule.transform].to_torch(np.asarray(leaf)))
    for alias, canon in keymap.tied.items():
        if canon in out:
            out[alias] = out[canon]
    if problems:
        raise ConversionError(problems, what)
    return out
