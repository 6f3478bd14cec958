"""Class layout of the synthetic benchmark (see ``lt_models.data.synthetic.generate``): shapes, colours, presets, and
which leaf class has which shape family, appearance and frequency rank. Independent of the seed, and free of pixels and
labels: `red_star` is the same class with the same frequency for every seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Shapes: normalised outlines whose extent is exactly [0,1] x [0,1], so the box a shape is drawn in is its
# tight bounding box.
# ---------------------------------------------------------------------------------------------------------


def _normalise(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    p = np.asarray(points, dtype=np.float64)
    p = (p - p.min(0)) / (p.max(0) - p.min(0))
    return tuple((float(x), float(y)) for x, y in p)


def _star(n: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    pts = []
    for k in range(2 * n):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return _normalise(pts)


_ARM = 0.34  # half-width (normalised) of the cross arms: 0.5 +- 0.17
SHAPES: dict[str, str | tuple[tuple[float, float], ...]] = {  # a named kind or a polygon outline
    "circle": "ellipse",
    "square": _normalise([(0, 0), (1, 0), (1, 1), (0, 1)]),
    "triangle": _normalise([(0.5, 0), (1, 1), (0, 1)]),
    "star": _star(),
    "ring": "ring",
    "cross": _normalise(
        [
            (0.33, 0),
            (0.67, 0),
            (0.67, 0.33),
            (1, 0.33),
            (1, 0.67),
            (0.67, 0.67),
            (0.67, 1),
            (0.33, 1),
            (0.33, 0.67),
            (0, 0.67),
            (0, 0.33),
            (0.33, 0.33),
        ]
    ),
    "diamond": _normalise([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]),
    "hexagon": _normalise([(0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1), (0, 0.5)]),
    "arrow": _normalise([(0, 0.3), (0.55, 0.3), (0.55, 0), (1, 0.5), (0.55, 1), (0.55, 0.7), (0, 0.7)]),
    "trapezoid": _normalise([(0.25, 0), (0.75, 0), (1, 1), (0, 1)]),
    "chevron": _normalise([(0, 0), (0.45, 0), (1, 0.5), (0.45, 1), (0, 1), (0.55, 0.5)]),
    "pentagon": _normalise(
        [(math.cos(-math.pi / 2 + k * 2 * math.pi / 5), math.sin(-math.pi / 2 + k * 2 * math.pi / 5)) for k in range(5)]
    ),
}
FAMILY_ORDER = list(SHAPES)

# Saturated colours that stand out from the light background, each with a near-identical twin for the
# confusable (implicit multi-label) leaf pairs.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 45, 45),
    "blue": (45, 80, 210),
    "green": (40, 160, 60),
    "yellow": (225, 200, 30),
    "purple": (140, 60, 180),
    "orange": (235, 130, 30),
    "cyan": (30, 180, 200),
    "pink": (230, 90, 170),
    "brown": (130, 80, 40),
    "black": (35, 35, 35),
}
TWINS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "red": ("crimson", (196, 40, 62)),
    "blue": ("cobalt", (40, 68, 196)),
    "green": ("jade", (38, 150, 78)),
    "yellow": ("gold", (218, 186, 36)),
    "purple": ("violet", (152, 66, 190)),
    "orange": ("amber", (228, 146, 34)),
    "cyan": ("teal", (30, 166, 186)),
    "pink": ("rose", (218, 80, 156)),
    "brown": ("umber", (118, 74, 44)),
    "black": ("charcoal", (50, 50, 54)),
}
COLOUR_ORDER = list(COLOURS)
TEXTURES = ("solid", "striped", "dotted")
# Appearances of presets with `appearance_combos`: every (colour, texture) pair, colour-major, so neighbouring
# appearances of a family differ only in texture (red, striped_red, dotted_red, blue, ...).
APPEARANCE_COMBOS: list[tuple[str, str]] = [(c, t) for c in COLOUR_ORDER for t in TEXTURES]


@dataclass(frozen=True)
class Preset:
    """Everything that defines a benchmark besides the seed."""

    name: str
    image_size: int
    families: int  # shape families = parent categories
    appearances: int  # leaves per family
    t_max: int  # training objects of the most frequent leaf
    t_min: int  # training objects of the rarest leaf
    q: float  # Zipf-Mandelbrot offset: larger q flattens the head
    val_ratio: float  # val objects per leaf = max(val_min, round(val_ratio * t))
    val_min: int
    objects_per_image: tuple[float, ...] = (0.35, 0.30, 0.20, 0.15)  # P(1..4 objects)
    min_size: int = 20
    max_size: int = 56
    n_confusable: int = 3  # twin leaf pairs (implicit multi-label)
    n_two_leaf: int = 2  # two-tone leaf pairs (explicit "car toy")
    # per confusable pair: P(twin labelled as base), P(base labelled as twin), P(labelled with both)
    swap_rates: tuple[tuple[float, float, float], ...] = ((0.35, 0.10, 0.20), (0.25, 0.08, 0.15), (0.45, 0.12, 0.25))
    two_leaf_rate: float = 0.3  # P(object of the pair's first leaf is drawn two-tone with the second)
    leaf_parent_rate: float = 0.2  # P(an object also carries its parent label)
    parent_only_rates: tuple[float, ...] = (0.05, 0.12, 0.2, 0.3)  # P(parent label only), cycled per family
    noise_std: float = 6.0
    workers: int = 1  # default render processes, 0 = one per CPU (at most 8); output does not depend on it
    # Fields below default to "off": a preset that leaves them alone gets exactly the output it had before them.
    appearance_combos: bool = False  # appearances are (colour, texture) pairs (up to 30) instead of one colour each
    super_categories: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (name, family indices): a third level
    leaf_super_rate: float = 0.0  # P(an object also carries its super-category label)
    super_only_rate: float = 0.0  # P(an object carries its super-category label only)
    scenes: tuple[tuple[int, ...], ...] = ()  # family indices per scene; () = objects of an image independent
    scene_share: float = 0.8  # P(an object of an image comes from the image's scene)
    max_occlusion: float = 0.0  # > 0: boxes may overlap; later boxes cover at most this share of an earlier box
    val_clean: int = 1  # the first N val objects of each leaf keep their own leaf label (train: the first one)

    @property
    def num_leaves(self) -> int:
        return self.families * self.appearances


PRESETS: dict[str, Preset] = {
    # 6 families x 4 appearances = 24 leaves + 6 parents; ~490 train / ~110 val images of 128 px.
    "demo": Preset(
        "demo",
        image_size=128,
        families=6,
        appearances=4,
        t_max=260,
        t_min=2,
        q=40,
        val_ratio=0.2,
        val_min=4,
        objects_per_image=(0.25, 0.30, 0.25, 0.20),
    ),
    # 10 families x 8 appearances = 80 leaves + 10 parents; ~6k train / ~700 val images of 128 px.
    "bench": Preset(
        "bench",
        image_size=128,
        families=10,
        appearances=8,
        t_max=2000,
        t_min=3,
        q=15,
        val_ratio=0.1,
        val_min=3,
        n_confusable=8,
        n_two_leaf=5,
        workers=0,
    ),
    # 8 families x 5 appearances = 40 leaves + 8 parents (18 r / 18 c / 12 f); ~1k train / ~390 val images of 128 px.
    # For benchmarks/bench_fidelity.py (do the papers' findings hold, over seeds): small enough for 3 seeds x 11
    # runs in about an hour on 2 CPU cores, and val_min = 20 val objects per leaf, so that APr rests on ~17
    # validation instances per rare class (10-32; common ~21, frequent ~38).
    "study": Preset(
        "study",
        image_size=128,
        families=8,
        appearances=5,
        t_max=450,
        t_min=2,
        q=20,
        val_ratio=0.15,
        val_min=20,
        objects_per_image=(0.25, 0.30, 0.25, 0.20),
        workers=0,
    ),
    # LVIS-like: 12 families x 26 appearances = 312 leaves (153 r / 125 c / 34 f) + 12 families + 3 super-categories;
    # ~1.4k train / ~380 val images of 128 px with 3-12 small, partly occluding objects mostly from one "scene" of
    # related families; every leaf has >= 10 val objects that keep their leaf label. See docs/data.md, "lvislike".
    "lvislike": Preset(
        "lvislike",
        image_size=128,
        families=12,
        appearances=26,
        t_max=240,
        t_min=1,
        q=640,  # large q: nearly exponential, so few objects sit in the head (fits the image budget)
        val_ratio=0.08,
        val_min=10,
        objects_per_image=(0.0, 0.0, 0.04, 0.05, 0.07, 0.09, 0.10, 0.12, 0.13, 0.13, 0.14, 0.13),  # 3-12, mean 8.4
        min_size=14,
        max_size=44,
        n_confusable=6,
        n_two_leaf=4,
        leaf_parent_rate=0.15,
        parent_only_rates=(0.02, 0.04, 0.07),
        workers=0,
        appearance_combos=True,
        # circle 0, square 1, triangle 2, star 3, ring 4, cross 5, diamond 6, hexagon 7, arrow 8, trapezoid 9,
        # chevron 10, pentagon 11
        super_categories=(("rounded", (0, 4, 7, 11)), ("angular", (1, 5, 6, 9)), ("pointed", (2, 3, 8, 10))),
        leaf_super_rate=0.1,
        super_only_rate=0.02,
        scenes=((0, 4, 8), (1, 5, 9), (2, 6, 10), (3, 7, 11)),
        scene_share=0.8,
        max_occlusion=0.4,
        val_clean=10,
    ),
}


def get_preset(preset: str | Preset) -> Preset:
    """A preset by name (ValueError for an unknown name), or the given Preset itself."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


# ---------------------------------------------------------------------------------------------------------
# Class layout (independent of the seed: `red_star` is the same class with the same frequency for every seed)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Leaf:
    index: int  # 0..L-1 in (family, slot) order; category id = index + 1
    family: int
    rank: int  # 0 = most frequent
    colour: str
    rgb: tuple[int, int, int]
    texture: str
    name: str
    twin_of: int | None = None  # leaf index of the confusable partner (set on both leaves of a pair)
    two_leaf_with: int | None = None  # partner of a two-tone pair (set on the first leaf only)


@dataclass
class Layout:
    """Leaves, families (parents) and super-categories of a preset; category ids: leaves, then families, then supers."""

    preset: Preset
    leaves: list[Leaf]
    family_names: list[str]
    confusable: list[tuple[int, int, tuple[float, float, float]]] = field(default_factory=list)  # (base, twin, rates)
    two_leaf: list[tuple[int, int]] = field(default_factory=list)
    super_names: list[str] = field(default_factory=list)  # empty: a two-level hierarchy (root -> family -> leaf)
    super_of_family: list[int] = field(default_factory=list)  # family index -> super-category index

    @property
    def num_categories(self) -> int:
        return len(self.leaves) + len(self.family_names) + len(self.super_names)

    def leaf_cat_id(self, leaf: int) -> int:
        return leaf + 1

    def parent_cat_id(self, family: int) -> int:
        return len(self.leaves) + family + 1

    def super_cat_id(self, family: int) -> int:
        """Category id of the super-category that family `family` belongs to (needs super-categories)."""
        return len(self.leaves) + len(self.family_names) + self.super_of_family[family] + 1


def zipf_targets(num: int, t_max: int, t_min: int, q: float) -> np.ndarray:
    """Objects per frequency rank: Zipf-Mandelbrot ``t_max * ((1+q)/(r+q))**s``, r = 1..num, t(num) = t_min."""
    r = np.arange(1, num + 1, dtype=np.float64)
    s = math.log(t_max / t_min) / math.log((num + q) / (1 + q)) if num > 1 else 1.0
    return np.maximum(1, np.round(t_max * ((1 + q) / (r + q)) ** s)).astype(np.int64)


def _appearance(p: Preset, f: int, a: int) -> tuple[str, str]:
    """(colour, texture) of appearance `a` in family `f`."""
    if p.appearance_combos:  # 26 of 30 pairs per family, starting at the family's own colour
        return APPEARANCE_COMBOS[(a + 3 * f) % len(APPEARANCE_COMBOS)]
    return COLOUR_ORDER[(a + 3 * f) % len(COLOUR_ORDER)], TEXTURES[(a + f) % len(TEXTURES)]


def _super_of_family(p: Preset) -> list[int]:
    """Family index -> super-category index of `p.super_categories` (ValueError unless each family is in one)."""
    owner: dict[int, int] = {}
    for s, (_name, fams) in enumerate(p.super_categories):
        for f in fams:
            if f in owner or not 0 <= f < p.families:
                raise ValueError(f"preset {p.name}: family {f} is out of range or in two super-categories")
            owner[f] = s
    if len(owner) != p.families:
        raise ValueError(f"preset {p.name}: every family needs a super-category")
    return [owner[f] for f in range(p.families)]


def build_layout(preset: str | Preset) -> Layout:
    """The class layout of a preset: leaves with family, frequency rank and appearance, twin and two-tone pairs."""
    p = get_preset(preset)
    max_app = len(APPEARANCE_COMBOS) if p.appearance_combos else len(COLOUR_ORDER)
    if p.families > len(FAMILY_ORDER) or p.appearances > max_app:
        raise ValueError(f"preset {p.name}: at most {len(FAMILY_ORDER)} families and {max_app} appearances")
    F, A = p.families, p.appearances
    leaves: list[Leaf] = []
    level_of: dict[tuple[int, int], int] = {}
    for f in range(F):
        for a in range(A):
            j = (a - f) % A  # frequency level inside the family (0 = head)
            level_of[(f, j)] = f * A + a
            colour, texture = _appearance(p, f, a)
            leaves.append(
                Leaf(
                    index=f * A + a,
                    family=f,
                    rank=F * j + f,
                    colour=colour,
                    rgb=COLOURS[colour],
                    texture=texture,
                    name="",
                )
            )
    layout = Layout(p, leaves, FAMILY_ORDER[:F])
    # Confusable twins: family f_k, levels (j, j+1); the rarer leaf takes the twin colour of the commoner one.
    for k in range(p.n_confusable):
        f = (2 * k) % F
        j = round(k * (A - 2) / max(1, p.n_confusable - 1))
        base, twin = leaves[level_of[(f, j)]], leaves[level_of[(f, j + 1)]]
        if base.twin_of is not None or twin.twin_of is not None:
            continue  # custom presets with more pairs than free leaf slots
        twin.colour, twin.rgb = TWINS[base.colour]
        twin.texture = base.texture
        base.twin_of, twin.twin_of = twin.index, base.index
        layout.confusable.append((base.index, twin.index, p.swap_rates[k % len(p.swap_rates)]))
    # Two-tone pairs: other families, levels (j, j+1).
    for k in range(p.n_two_leaf):
        f = (2 * k + 1) % F
        j = round(k * (A - 2) / max(1, p.n_two_leaf - 1))
        first, second = leaves[level_of[(f, j)]], leaves[level_of[(f, j + 1)]]
        if first.twin_of is not None or second.twin_of is not None or first.two_leaf_with is not None:
            continue
        first.two_leaf_with = second.index
        layout.two_leaf.append((first.index, second.index))
    for leaf in leaves:
        tex = "" if leaf.texture == "solid" else leaf.texture + "_"
        leaf.name = f"{tex}{leaf.colour}_{layout.family_names[leaf.family]}"
    if p.super_categories:
        layout.super_names = [name for name, _fams in p.super_categories]
        layout.super_of_family = _super_of_family(p)
    names = [leaf.name for leaf in leaves] + layout.family_names + layout.super_names
    if len(set(names)) != len(names):
        raise ValueError(f"preset {p.name}: category names are not unique")
    return layout
