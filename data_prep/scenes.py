"""Scenes of flat shapes and the referring expressions that pick out one shape.

The synthetic RefCOCO-format data (``data_prep.synth``) needs expressions whose words matter:
scenes hold distractors sharing the target's shape or colour, and every expression is checked
against its scene by a small formal semantics (``resolve``) before it is kept. Expressions
are structured values (``Attribute``, ``Relation``, ``Ordinal``, ``Superlative``) turned into
text by ``render``; ``parse`` reads that text back, so a test can re-check written sentences
without trusting the generation path.

Geometry is in pixels of a square image of side ``image_size``; y grows downwards. Objects
never overlap (their circumscribing circles keep a gap), so an object's polygon is exactly
what is drawn.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ellipse", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 20),
    "purple": (135, 50, 175),
    "orange": (245, 125, 15),
}
SIZES: tuple[str, ...] = ("small", "large")
# Circumradius as a fraction of the image side, per size label; the gap keeps labels visible.
RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (0.065, 0.09), "large": (0.125, 0.16)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
ORDINAL_WORDS: dict[int, str] = {2: "second", 3: "third"}
EXTREME_WORDS: dict[str, str] = {
    "left": "leftmost",
    "right": "rightmost",
    "top": "topmost",
    "bottom": "bottommost",
}
# Positions closer than this (fraction of the image side) along an axis are "unclear".
POSITION_MARGIN = 0.05
# The largest (smallest) object must beat the runner-up by this area ratio.
AREA_RATIO = 1.3


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. ``polygon`` is the flat [x0, y0, x1, y1, ...] outline in pixels."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    polygon: tuple[float, ...]

    @cached_property
    def area(self) -> float:
        """Shoelace area of the polygon (the semantics' notion of "large")."""
        xs, ys = self.polygon[0::2], self.polygon[1::2]
        n = len(xs)
        return abs(sum(xs[k] * ys[(k + 1) % n] - xs[(k + 1) % n] * ys[k] for k in range(n))) / 2


@dataclass(frozen=True)
class Scene:
    image_size: int
    objects: tuple[SceneObject, ...]


# ------------------------------------------------------------------------------ scene sampling
def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> tuple[float, ...]:
    """Polygon of a shape with circumradius ``r``; curves become 32-gons."""
    if shape == "circle":
        radii, n = [r], 32
    elif shape == "ellipse":
        n = 32
        ts = np.linspace(0, 2 * np.pi, n, endpoint=False)
        px, py = r * np.cos(ts), 0.55 * r * np.sin(ts)
        xs = cx + px * math.cos(angle) - py * math.sin(angle)
        ys = cy + px * math.sin(angle) + py * math.cos(angle)
        return tuple(round(float(v), 2) for xy in zip(xs, ys, strict=True) for v in xy)
    elif shape == "star":
        radii, n = [r, 0.45 * r], 10
    else:
        radii, n = [r], {"square": 4, "triangle": 3, "hexagon": 6}[shape]
    ts = angle + np.linspace(0, 2 * np.pi, n, endpoint=False)
    rs = np.resize(np.asarray(radii), n)
    xs, ys = cx + rs * np.cos(ts), cy + rs * np.sin(ts)
    return tuple(round(float(v), 2) for xy in zip(xs, ys, strict=True) for v in xy)


_UPRIGHT = {"triangle": -math.pi / 2, "star": -math.pi / 2, "square": math.pi / 4, "hexagon": 0.0}


def make_scene(
    rng: np.random.Generator, image_size: int, min_objects: int = 2, max_objects: int = 6
) -> Scene:
    """Sample 2..6 non-overlapping shapes; most share the shape or colour of an earlier one,
    so that a description must combine words to single one out (the distractors)."""
    wanted = int(rng.integers(min_objects, max_objects + 1))
    gap = 0.03 * image_size
    objects: list[SceneObject] = []
    for _ in range(wanted):
        if objects and rng.random() < 0.75:
            model = objects[int(rng.integers(len(objects)))]
            share = rng.random()
            shape = model.shape if share < 0.65 else SHAPES[int(rng.integers(len(SHAPES)))]
            colour = model.colour if share >= 0.35 else str(rng.choice(list(COLOURS)))
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = str(rng.choice(list(COLOURS)))
        size = SIZES[int(rng.integers(len(SIZES)))]
        lo, hi = RADIUS_RANGE[size]
        r = float(rng.uniform(lo, hi)) * image_size
        for _attempt in range(60):
            cx, cy = rng.uniform(r + gap, image_size - r - gap, size=2)
            if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.radius + gap for o in objects):
                break
        else:
            continue  # no room left for this one: the scene simply has fewer objects
        angle = _UPRIGHT.get(shape, float(rng.uniform(0, math.pi)))
        angle += float(rng.uniform(-0.2, 0.2))
        polygon = _outline(shape, float(cx), float(cy), r, angle)
        objects.append(SceneObject(shape, colour, size, float(cx), float(cy), r, polygon))
    if len(objects) < min_objects:  # only possible for absurdly small images
        raise ValueError(f"image_size={image_size} leaves no room for {min_objects} objects")
    return Scene(image_size, tuple(objects))


# ---------------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Desc:
    """A noun phrase: any of size, colour, shape; a missing shape reads "shape"."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return (
            (self.shape is None or self.shape == obj.shape)
            and (self.colour is None or self.colour == obj.colour)
            and (self.size is None or self.size == obj.size)
        )

    def words(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape or "shape") if w)


@dataclass(frozen=True)
class Attribute:
    """ "the small blue triangle"."""

    desc: Desc


@dataclass(frozen=True)
class Relation:
    """ "the circle left of the green square": ``desc`` placed by ``relation`` to ``landmark``."""

    desc: Desc
    relation: str
    landmark: Desc


@dataclass(frozen=True)
class Ordinal:
    """ "the second circle from the left" (rank 1 reads "the leftmost circle")."""

    desc: Desc
    direction: str
    rank: int


@dataclass(frozen=True)
class Superlative:
    """ "the largest red shape" / "the smallest circle"."""

    desc: Desc
    extreme: str  # "largest" or "smallest"


Expression = Attribute | Relation | Ordinal | Superlative
KINDS: tuple[str, ...] = ("attribute", "relation", "ordinal", "superlative")
"""What an expression tests, one name per expression type (an extreme such as "leftmost" is an
ordinal of rank 1)."""


def kind_of(expr: Expression) -> str:
    """The kind of an expression: one of ``KINDS``."""
    match expr:
        case Attribute():
            return "attribute"
        case Relation():
            return "relation"
        case Ordinal():
            return "ordinal"
        case Superlative():
            return "superlative"
    raise TypeError(f"not an expression: {expr!r}")


def carrier_words(expr: Expression) -> tuple[str, ...]:
    """The words of the rendered text that carry the expression's kind: the attributes named,
    the relation ("left of"), the ordinal and its side ("second", "left"; "leftmost") or the
    superlative ("largest")."""
    match expr:
        case Attribute(desc):
            return tuple(w for w in (desc.size, desc.colour, desc.shape) if w)
        case Relation(_, relation, _):
            return (relation,)
        case Ordinal(_, direction, 1):
            return (EXTREME_WORDS[direction],)
        case Ordinal(_, direction, rank):
            return (ORDINAL_WORDS[rank], direction)
        case Superlative(_, extreme):
            return (extreme,)
    raise TypeError(f"not an expression: {expr!r}")


def render(expr: Expression) -> str:
    """The expression's text (lowercase words separated by single spaces)."""
    match expr:
        case Attribute(desc):
            return f"the {desc.words()}"
        case Relation(desc, relation, landmark):
            return f"the {desc.words()} {relation} the {landmark.words()}"
        case Ordinal(desc, direction, 1):
            return f"the {EXTREME_WORDS[direction]} {desc.words()}"
        case Ordinal(desc, direction, rank):
            return f"the {ORDINAL_WORDS[rank]} {desc.words()} from the {direction}"
        case Superlative(desc, extreme):
            return f"the {extreme} {desc.words()}"
    raise TypeError(f"not an expression: {expr!r}")


_DESC = rf"(?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLOURS)}) )?({'|'.join(SHAPES)}|shape)"
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attribute", re.compile(rf"the {_DESC}")),
    ("relation", re.compile(rf"the {_DESC} ({'|'.join(RELATIONS)}) the {_DESC}")),
    ("extreme", re.compile(rf"the ({'|'.join(EXTREME_WORDS.values())}) {_DESC}")),
    (
        "ordinal",
        re.compile(rf"the ({'|'.join(ORDINAL_WORDS.values())}) {_DESC} from the ({'|'.join(DIRECTIONS)})"),
    ),
    ("superlative", re.compile(rf"the (largest|smallest) {_DESC}")),
)


def _desc(size: str | None, colour: str | None, shape: str) -> Desc:
    return Desc(None if shape == "shape" else shape, colour, size)


def parse(text: str) -> Expression:
    """Read back a rendered expression; raises ValueError naming the text if it is not one."""
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        if kind == "attribute":
            return Attribute(_desc(*g))
        if kind == "relation":
            return Relation(_desc(*g[0:3]), g[3], _desc(*g[4:7]))
        if kind == "extreme":
            direction = next(d for d, w in EXTREME_WORDS.items() if w == g[0])
            return Ordinal(_desc(*g[1:4]), direction, 1)
        if kind == "ordinal":
            rank = next(k for k, w in ORDINAL_WORDS.items() if w == g[0])
            return Ordinal(_desc(*g[1:4]), g[4], rank)
        return Superlative(_desc(*g[1:4]), g[0])
    raise ValueError(f"not a synthetic referring expression: {text!r}")


# ------------------------------------------------------------------------------------ semantics
def _relation_holds(obj: SceneObject, relation: str, landmark: SceneObject, margin: float) -> bool | None:
    """True / False, or None when the two centres are too close along the axis to tell."""
    delta = {
        "left of": landmark.cx - obj.cx,
        "right of": obj.cx - landmark.cx,
        "above": landmark.cy - obj.cy,
        "below": obj.cy - landmark.cy,
    }[relation]
    if abs(delta) <= margin:
        return None
    return delta > 0


def _axis_key(obj: SceneObject, direction: str) -> float:
    """Position along ``direction``: smaller means nearer the named side."""
    return {"left": obj.cx, "right": -obj.cx, "top": obj.cy, "bottom": -obj.cy}[direction]


def resolve(expr: Expression, scene: Scene) -> tuple[int, ...]:
    """Indices of every object the expression may denote in the scene.

    An expression is usable iff this is exactly one index. Unclear cases (near-equal
    positions or areas) count every object they could mean; an expression whose premise
    fails (a landmark that is not unique, fewer than two objects to rank) denotes nothing.
    """
    objs = scene.objects
    margin = POSITION_MARGIN * scene.image_size
    candidates = [i for i, o in enumerate(objs) if expr.desc.matches(o)]
    match expr:
        case Attribute():
            return tuple(candidates)
        case Relation(_, relation, landmark):
            landmarks = [j for j, o in enumerate(objs) if landmark.matches(o)]
            if len(landmarks) != 1:  # "the square" must name one square
                return ()
            (j,) = landmarks
            return tuple(
                i
                for i in candidates
                if i != j and _relation_holds(objs[i], relation, objs[j], margin) is not False
            )
        case Ordinal(_, direction, rank):
            if len(candidates) < 2 or rank > len(candidates):
                return ()
            ordered = sorted(candidates, key=lambda i: _axis_key(objs[i], direction))
            # The ranked object, and every other one too near it along the axis to tell apart.
            pick = _axis_key(objs[ordered[rank - 1]], direction)
            return tuple(sorted(i for i in ordered if abs(_axis_key(objs[i], direction) - pick) <= margin))
        case Superlative(_, extreme):
            if len(candidates) < 2:
                return ()
            areas = sorted(((objs[i].area, i) for i in candidates), reverse=extreme == "largest")
            best, runner = areas[0][0], areas[1][0]
            clear = best >= AREA_RATIO * runner if extreme == "largest" else runner >= AREA_RATIO * best
            return (areas[0][1],) if clear else tuple(sorted(i for _, i in areas[:2]))
    raise TypeError(f"not an expression: {expr!r}")


def _descs_of(obj: SceneObject) -> list[Desc]:
    """Every noun phrase true of ``obj`` (7 subsets of its size, colour and shape)."""
    out = []
    for keep_size, keep_colour, keep_shape in itertools.product((False, True), repeat=3):
        if keep_size or keep_colour or keep_shape:
            out.append(
                Desc(
                    obj.shape if keep_shape else None,
                    obj.colour if keep_colour else None,
                    obj.size if keep_size else None,
                )
            )
    return out


def referring_expressions(scene: Scene, target: int) -> dict[str, list[Expression]]:
    """Every expression, by kind, that denotes exactly ``target`` in ``scene``.

    Candidates are proposed generously and each one is kept only if ``resolve`` returns
    ``(target,)``; the proposal rules never have to be right on their own.
    """
    obj = scene.objects[target]
    descs = _descs_of(obj)
    unique = [d for d in descs if resolve(Attribute(d), scene) == (target,)]
    # Relations and ordinals use the short heads ("circle", "red shape", "red circle"); the
    # landmark is named by its shortest unique descriptions.
    heads = [d for d in descs if d.size is None]
    found: dict[str, list[Expression]] = {kind: [] for kind in KINDS}
    found["attribute"] = [Attribute(d) for d in unique]
    margin = POSITION_MARGIN * scene.image_size
    counts = Counter(d for o in scene.objects for d in _descs_of(o))  # objects each phrase fits
    for j, other in enumerate(scene.objects):
        if j == target:
            continue
        landmark_descs = [d for d in _descs_of(other) if counts[d] == 1]
        if not landmark_descs:
            continue
        shortest = min(len(d.words().split()) for d in landmark_descs)
        relations = [r for r in RELATIONS if _relation_holds(obj, r, other, margin)]
        for landmark, head, relation in itertools.product(
            [d for d in landmark_descs if len(d.words().split()) == shortest], heads, relations
        ):
            expr = Relation(head, relation, landmark)
            if resolve(expr, scene) == (target,):
                found["relation"].append(expr)
    for head in heads:
        candidates = [i for i, o in enumerate(scene.objects) if head.matches(o)]
        if len(candidates) < 2:
            continue
        proposals: list[Expression] = [Superlative(head, "largest"), Superlative(head, "smallest")]
        for direction in DIRECTIONS:
            ordered = sorted(candidates, key=lambda i, d=direction: _axis_key(scene.objects[i], d))
            rank = ordered.index(target) + 1
            if rank <= 3:
                proposals.append(Ordinal(head, direction, rank))
        for expr in proposals:
            if resolve(expr, scene) == (target,):
                found[kind_of(expr)].append(expr)
    return found
