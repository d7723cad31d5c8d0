"""The shapes world: procedural scenes, their texts, and a parser that reads images back.

Small on purpose: 4 shapes x 6 colours x 2 sizes on a 3x3 grid, 1-3 objects per image,
native sizes 48-96 px (multiples of 8 and 16, non-square too). Tiny models trained for
minutes on CPU can learn it, and every answer, caption and text-to-image prompt is fully
determined by the image, so accuracies near 100 are reachable while the priors are weak
(the VQA majority answer is well under 30%). Everything is deterministic from a seed:
`random.Random` with string seeds (hashed with SHA-512, stable across Python versions).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 200),
    "cyan": (30, 200, 210),
}
BACKGROUND = (240, 240, 240)
SIZES = ("small", "large")
XS = ("left", "center", "right")
YS = ("top", "middle", "bottom")
SIDES = (48, 64, 80, 96)  # image width/height choices (multiples of 8 for the VQ, 16 for ViT patches)
NUM_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three"}
# half box size as a fraction of the smaller grid-cell side; jitter of the centre likewise.
# Large objects nearly fill a cell, so objects in 4-neighbouring cells never share a colour
# (they would merge into one blob when blurred).
HALF = {"small": 0.30, "large": 0.44}
JITTER = 0.02


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    x: str  # column: left | center | right
    y: str  # row: top | middle | bottom
    jx: float = 0.0  # centre jitter, fraction of a cell
    jy: float = 0.0

    def attrs(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "x": self.x, "y": self.y}


@dataclass
class Scene:
    width: int
    height: int
    objects: list[Obj] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height,
                "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(int(d["width"]), int(d["height"]), [Obj(**o) for o in d["objects"]])

    def cells(self) -> set[tuple[str, str]]:
        return {(o.x, o.y) for o in self.objects}


# ----------------------------------------------------------------------------- scenes


def _new_obj(rng: random.Random, x: str, y: str) -> Obj:
    return Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), x, y,
               round(rng.uniform(-JITTER, JITTER), 3), round(rng.uniform(-JITTER, JITTER), 3))


def _adjacent(a: Obj, b: Obj) -> bool:
    return abs(XS.index(a.x) - XS.index(b.x)) + abs(YS.index(a.y) - YS.index(b.y)) == 1


def _ok(objs: list[Obj]) -> bool:
    """Distinct (colour, shape) pairs; no same-coloured 4-neighbours."""
    for i, a in enumerate(objs):
        for b in objs[:i]:
            if (a.color, a.shape) == (b.color, b.shape) or (a.color == b.color and _adjacent(a, b)):
                return False
    return True


def random_scene(rng: random.Random, n_objects: int | None = None, sides=SIDES) -> Scene:
    """1-3 objects in distinct grid cells; no two objects share (colour, shape), so every
    object can be named by its colour and shape."""
    w, h = rng.choice(sides), rng.choice(sides)
    n = n_objects if n_objects is not None else rng.choice((1, 2, 3))
    cells = rng.sample([(x, y) for y in YS for x in XS], n)
    objs: list[Obj] = []
    for x, y in cells:
        while True:
            o = _new_obj(rng, x, y)
            if all((o.color, o.shape) != (p.color, p.shape) and not (o.color == p.color and _adjacent(o, p))
                   for p in objs):
                break
        objs.append(o)
    return Scene(w, h, objs)


def _geometry(scene: Scene, o: Obj) -> tuple[float, float, float]:
    """Centre (cx, cy) and half size in pixels."""
    cw, ch = scene.width / 3, scene.height / 3
    cell = min(cw, ch)
    cx = (XS.index(o.x) + 0.5 + o.jx) * cw
    cy = (YS.index(o.y) + 0.5 + o.jy) * ch
    # integer centres: the same shape rasterises the same way wherever it is (parse_image's
    # templates rely on it)
    return float(round(cx)), float(round(cy)), HALF[o.size] * cell


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, s = _geometry(scene, o)
        _draw(draw, o.shape, cx, cy, s, COLORS[o.color])
    return img


# ----------------------------------------------------------------------------- texts


def position_name(x: str, y: str) -> str:
    """(left, top) -> 'top left'; (center, middle) -> 'center'; (left, middle) -> 'left'."""
    if y == "middle":
        return "center" if x == "center" else x
    return y if x == "center" else f"{y} {x}"


def position_phrase(x: str, y: str) -> str:
    name = position_name(x, y)
    return "in the center" if name == "center" else f"at the {name}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(o: Obj, size=True, color=True, shape=True) -> str:
    words = ([o.size] if size else []) + ([o.color] if color else []) + ([o.shape] if shape else ["object"])
    return " ".join(words)


def _item(o: Obj, style: int) -> str:
    d = describe(o)
    if style == 0:
        return f"{_article(d)} {d} {position_phrase(o.x, o.y)}"
    if style == 1:
        return f"{_article(d)} {d} ({position_name(o.x, o.y)})"
    return f"{d}, {position_name(o.x, o.y)}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene, style: int = 0) -> str:
    """One of 5 phrasings; every one names size, colour, shape and position of every object
    (object before its position), so `parse_caption` recovers the scene from any of them."""
    objs = scene.objects
    n = len(objs)
    if style == 0:
        s = _join([_item(o, 0) for o in objs])
        return s[0].upper() + s[1:] + "."
    if style == 1:
        if n == 1:
            return f"There is {_item(objs[0], 0)}."
        return f"There are {NUM_WORDS[n]} objects: {_join([_item(o, 0) for o in objs])}."
    if style == 2:
        word = "shape" if n == 1 else "shapes"
        return f"{NUM_WORDS[n].capitalize()} {word}: " + "; ".join(_item(o, 2) for o in objs) + "."
    if style == 3:
        return f"An image with {_join([_item(o, 1) for o in objs])}."
    return f"A picture showing {_join([_item(o, 0) for o in objs])} on a gray background."


N_CAPTION_STYLES = 5


def captions(scene: Scene) -> list[str]:
    return [caption(scene, s) for s in range(N_CAPTION_STYLES)]


# ----------------------------------------------------------------------------- VQA

_VARIANTS_NUM = {0: "none", 1: "one", 2: "two", 3: "three"}


def ten_answers(answer: str, rng: random.Random, answer_type: str) -> list[str]:
    """VQAv2-style 10 answers: 7 canonical + 3 surface variants that the official
    normalisation maps back to the canonical one ("two" -> "2", "Red." -> "red")."""
    if answer_type == "number":
        variants = [_VARIANTS_NUM[int(answer)], f"{answer}.", _VARIANTS_NUM[int(answer)].capitalize()]
    else:
        variants = [answer.capitalize(), f"{answer}.", f"{answer}!"]
        if answer in SHAPES:
            variants[2] = f"a {answer}"
    answers = [answer] * 7 + [rng.choice(variants) for _ in range(3)]
    rng.shuffle(answers)
    return answers


def _ref(scene: Scene, o: Obj, rng: random.Random, drop: str) -> str | None:
    """A referring expression for `o` that does not use attribute `drop` and is unique in
    the scene (so the question has exactly one answer); None if there is none."""
    others = [p for p in scene.objects if p is not o]
    cands = []
    if drop != "shape":
        cands.append(({"shape"}, o.shape))
    if drop != "color":
        cands.append(({"color"}, f"{o.color} object" if drop == "shape" else o.color))
    if drop not in ("size", "shape"):
        cands.append(({"size", "shape"}, f"{o.size} {o.shape}"))
    if drop not in ("color", "shape"):
        cands.append(({"color", "shape"}, f"{o.color} {o.shape}"))
    if drop == "shape":
        cands.append(({"size", "color"}, f"{o.size} {o.color} object"))
    if drop not in ("x",) and drop != "shape":
        cands.append(({"shape", "pos"}, f"{o.shape} {position_phrase(o.x, o.y)}"))
    if drop == "shape":
        cands.append(({"pos"}, f"object {position_phrase(o.x, o.y)}"))

    def key(p: Obj, attrs):
        return tuple(p.attrs()[a] if a != "pos" else (p.x, p.y) for a in sorted(attrs))

    unique = [text for attrs, text in cands if all(key(p, attrs) != key(o, attrs) for p in others)]
    if not unique:
        return None
    # prefer the shortest unique reference most of the time (natural), sometimes a longer one
    return unique[0] if rng.random() < 0.7 else rng.choice(unique)


QTYPES = ("color", "shape", "count", "exist", "relation", "where", "size")
QWEIGHTS = (0.18, 0.16, 0.15, 0.15, 0.12, 0.12, 0.12)


def question_weights(weights: dict[str, float] | None, key: str = "question weights") -> tuple[float, ...]:
    """QWEIGHTS with some types re-weighted ({"relation": 0.3}); bad entries are a ValueError
    that names `key` (the config key they came from)."""
    if not weights:
        return QWEIGHTS
    bad = sorted(set(weights) - set(QTYPES))
    if bad:
        raise ValueError(f"{key}: unknown question type(s) {bad}; choose from {list(QTYPES)}")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"{key}: weights must be >= 0, got {weights}")
    out = tuple(float(weights.get(t, w)) for t, w in zip(QTYPES, QWEIGHTS))
    if sum(out) <= 0:
        raise ValueError(f"{key}: weights sum to 0: {weights}")
    return out


def make_vqa(scene: Scene, rng: random.Random, qtype: str | None = None,
             weights: tuple[float, ...] = QWEIGHTS) -> dict:
    """One question about the scene: {question, answer, answers (10), question_type, answer_type};
    its type drawn with `weights` (per QTYPES) unless `qtype` is given. A weighting whose types
    cannot be asked about this scene (only "relation" on one object) falls back to QWEIGHTS."""
    for i in range(100):
        t = qtype or rng.choices(QTYPES, weights if i < 50 else QWEIGHTS)[0]
        q = _question(scene, rng, t)
        if q is not None:
            question, answer, qt, at = q
            return {"question": question, "answer": answer, "answers": ten_answers(answer, rng, at),
                    "question_type": qt, "answer_type": at}
    raise RuntimeError("no question could be asked about this scene")  # unreachable in practice


def more_vqa(meta: dict, n: int, rng: random.Random, image_index: int = 0,
             weights: dict[str, float] | None = None) -> list[dict]:
    """Up to `n` more questions (make_vqa dicts) about the scene of image `image_index` of a
    document (`meta["scenes"]`), distinct from each other and from the doc's own question.

    Training-time augmentation shared by both model families: a VQA shard holds one question
    per image; asking more about the stored scene graph makes the answer loss dense while the
    image is encoded once. `weights` re-weights question types ({"exist": 0.3}; the others keep
    QWEIGHTS): a training curriculum, the shards' own questions are unchanged. Docs without a
    scene graph give [].
    """
    qweights = question_weights(weights)
    scenes = meta.get("scenes") or []
    if n <= 0 or image_index >= len(scenes) or not scenes[image_index]:
        return []
    scene = Scene.from_dict(scenes[image_index])
    asked, out = {meta.get("question")}, []
    for _ in range(3 * n):
        qa = make_vqa(scene, rng, weights=qweights)
        if qa["question"] not in asked:
            asked.add(qa["question"])
            out.append(qa)
            if len(out) == n:
                break
    return out


def _question(scene: Scene, rng: random.Random, t: str):
    objs = scene.objects
    o = rng.choice(objs)
    if t == "color":
        ref = _ref(scene, o, rng, "color")
        if ref is None:
            return None
        tpl = rng.choice(["What color is the {r}?", "What is the color of the {r}?", "Which color does the {r} have?"])
        return tpl.format(r=ref), o.color, "what color is the", "other"
    if t == "shape":
        ref = _ref(scene, o, rng, "shape")
        if ref is None:
            return None
        tpl = rng.choice(["What shape is the {r}?", "What is the shape of the {r}?", "Which shape is the {r}?"])
        return tpl.format(r=ref), o.shape, "what shape is the", "other"
    if t == "count":
        mode = rng.choice(["all", "all", "color", "shape"])
        if mode == "all":
            n = len(objs)
            tpl = rng.choice(["How many objects are there?", "How many shapes are in the image?",
                              "How many objects are in the picture?"])
            return tpl, str(n), "how many", "number"
        if mode == "color":
            c = rng.choice([p.color for p in objs] + list(COLORS))
            n = sum(p.color == c for p in objs)
            return f"How many {c} objects are there?", str(n), "how many", "number"
        s = rng.choice([p.shape for p in objs] + list(SHAPES))
        n = sum(p.shape == s for p in objs)
        return f"How many {s}s are there?", str(n), "how many", "number"
    if t == "exist":
        if rng.random() < 0.5:
            c, s, ans = o.color, o.shape, "yes"
        else:
            present = {(p.color, p.shape) for p in objs}
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            # half of the "no" cases share colour or shape with an object (harder negatives)
            near = [(c, s) for c, s in absent if any(c == p.color or s == p.shape for p in objs)]
            c, s = rng.choice(near if near and rng.random() < 0.5 else absent)
            ans = "no"
        tpl = rng.choice(["Is there a {c} {s}?", "Is there a {c} {s} in the image?", "Does the picture contain a {c} {s}?"])
        return tpl.format(c=c, s=s), ans, "is there a", "yes/no"
    if t == "relation":
        if len(objs) < 2:
            return None
        a, b = rng.sample(objs, 2)
        rels = []
        if a.x != b.x:
            rels += [("to the left of", XS.index(a.x) < XS.index(b.x)), ("to the right of", XS.index(a.x) > XS.index(b.x))]
        if a.y != b.y:
            rels += [("above", YS.index(a.y) < YS.index(b.y)), ("below", YS.index(a.y) > YS.index(b.y))]
        want = rng.random() < 0.5
        pick = [r for r in rels if r[1] == want] or rels
        rel, truth = rng.choice(pick)
        ra, rb = f"{a.color} {a.shape}", f"{b.color} {b.shape}"
        return f"Is the {ra} {rel} the {rb}?", "yes" if truth else "no", "is the", "yes/no"
    if t == "where":
        ref = _ref(scene, o, rng, "x")
        if ref is None or "position" in ref:
            return None
        tpl = rng.choice(["Where is the {r}?", "Where in the image is the {r}?"])
        return tpl.format(r=ref), position_name(o.x, o.y), "where is the", "other"
    if t == "size":
        ref = _ref(scene, o, rng, "size")
        if ref is None:
            return None
        tpl = rng.choice(["Is the {r} large or small?", "What size is the {r}?", "Is the {r} small or large?"])
        return tpl.format(r=ref), o.size, "what size is the", "other"
    raise ValueError(f"unknown question type {t!r}")


# ----------------------------------------------------------------------------- edits


def _copy(scene: Scene) -> Scene:
    return Scene(scene.width, scene.height, [Obj(**asdict(o)) for o in scene.objects])


def _try_edit(scene: Scene, rng: random.Random, op: str) -> tuple[Scene, str] | None:
    new = _copy(scene)
    o = rng.choice(new.objects)
    name = f"{o.color} {o.shape}"
    free = [(x, y) for y in YS for x in XS if (x, y) not in new.cells()]
    if op == "recolor":
        o.color = rng.choice([c for c in COLORS if c != o.color])
        text = f"The {name} turns {o.color}."
    elif op == "reshape":
        o.shape = rng.choice([s for s in SHAPES if s != o.shape])
        text = f"The {name} becomes {_article(o.shape)} {o.shape}."
    elif op == "resize":
        o.size = "small" if o.size == "large" else "large"
        text = f"The {name} {'grows' if o.size == 'large' else 'shrinks'}."
    elif op == "move":
        o.x, o.y = rng.choice(free)
        text = f"The {name} moves to the {position_name(o.x, o.y)}."
    elif op == "add":
        x, y = rng.choice(free)
        p = _new_obj(rng, x, y)
        new.objects.append(p)
        text = f"{_article(describe(p)).capitalize()} {describe(p)} appears {position_phrase(x, y)}."
    elif op == "remove":
        new.objects.remove(o)
        text = f"The {name} disappears."
    else:
        raise ValueError(op)
    return (new, text) if _ok(new.objects) else None


def edit_scene(scene: Scene, rng: random.Random) -> tuple[Scene, str]:
    """One edit described in words -> (edited scene, sentence); the result obeys the
    same constraints as `random_scene`."""
    ops = ["recolor", "move", "resize", "reshape"]
    if len(scene.objects) < 3:
        ops.append("add")
    if len(scene.objects) > 1:
        ops.append("remove")
    for _ in range(50):
        out = _try_edit(scene, rng, rng.choice(ops))
        if out is not None:
            return out
    return _try_edit(scene, rng, "resize")  # always valid


def interleaved_doc(rng: random.Random, n_edits: int | None = None) -> tuple[list, list[Scene]]:
    """texts/images aligned lists (images as Scene placeholders) for a scene-edit story."""
    scene = random_scene(rng)
    n_edits = n_edits if n_edits is not None else rng.choice((1, 2))
    texts, scenes = [None], [scene]
    intro = rng.choice(["Here is a scene: ", "In this picture: ", "We start with "])
    for i in range(n_edits):
        new, sentence = edit_scene(scene, rng)
        desc = caption(scene, rng.randrange(N_CAPTION_STYLES))
        lead = intro if i == 0 else ""
        texts += [f"{lead}{desc} {sentence}" if not lead else f"{lead}{desc[0].lower() + desc[1:]} {sentence}", None]
        scenes.append(new)
        scene = new
    texts.append("Now: " + caption(scene, rng.randrange(N_CAPTION_STYLES)))
    return texts, scenes


# ----------------------------------------------------------------------------- parsing

_OBJ_RE = re.compile(r"\b(?:(small|large)\s+)?(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")s?\b", re.I)
_POS_RE = re.compile(r"\b(top left|top right|bottom left|bottom right|top|bottom|left|right|center)\b", re.I)
_POS = {position_name(x, y): (x, y) for y in YS for x in XS}


def parse_caption(text: str) -> list[dict]:
    """Objects a caption/prompt asks for: [{shape, color, size|None, x|None, y|None}].

    An object is '(size) colour shape'; its position is the first position phrase after it
    and before the next object."""
    matches = list(_OBJ_RE.finditer(text))
    out = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        pos = _POS_RE.search(text, m.end(), end)
        x, y = _POS[pos.group(1).lower()] if pos else (None, None)
        out.append({"shape": m.group(3).lower(), "color": m.group(2).lower(),
                    "size": m.group(1).lower() if m.group(1) else None, "x": x, "y": y})
    return out


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask -> list of (N, 2) pixel coords.
    Hand-written (scipy is not a runtime dependency); images are <= 96x96, so a flood fill
    over foreground pixels is cheap."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist()):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.array(pix))
    return comps


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - s * 0.9, cy - s * 0.9, cx + s * 0.9, cy + s * 0.9], fill=fill)
    elif shape == "triangle":  # apex up
        draw.polygon([(cx, cy - s), (cx + s, cy + s), (cx - s, cy + s)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - s), (cx + s, cy), (cx, cy + s), (cx - s, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _match_template(mask: np.ndarray, pix: np.ndarray, cell: float) -> tuple[str, str]:
    """Best (shape, size) by IoU between the component and each rendered template placed at
    the component's box centre: robust to blur and speckle, unlike fill-ratio rules that
    break on 8-px objects."""
    h, w = mask.shape
    y0, x0 = pix.min(0)
    y1, x1 = pix.max(0)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    m = mask.astype(bool)
    best, best_iou = ("circle", "small"), -1.0
    for size in SIZES:
        s = HALF[size] * cell
        for shape in SHAPES:
            t = Image.new("1", (w, h), 0)
            _draw(ImageDraw.Draw(t), shape, cx, cy, s, 1)
            ta = np.asarray(t, dtype=bool)
            # align the template's pixel box with the component's (rasterisation offsets)
            ty, tx = np.nonzero(ta)
            if len(ty):
                dy = int(round(((y0 + y1) - (ty.min() + ty.max())) / 2))
                dx = int(round(((x0 + x1) - (tx.min() + tx.max())) / 2))
                ta = np.roll(ta, (dy, dx), axis=(0, 1))
            inter = np.logical_and(ta, m).sum()
            iou = inter / max(1, np.logical_or(ta, m).sum())
            if iou > best_iou:
                best, best_iou = (shape, size), iou
    return best


def parse_image(img) -> list[dict]:
    """Read an image (rendered, or VQ-decoded: blurred/noisy) back into objects
    [{shape, color, size, x, y}], sorted by position (row, then column).

    Pixels are labelled by the nearest palette colour (background estimated from the
    border), a 3x3 majority filter removes reconstruction speckle, then each connected
    component large enough to be an object is matched against the 8 (shape, size)
    templates; its centre gives the grid cell."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    names = list(COLORS)
    pal = np.array([bg] + [COLORS[c] for c in names], dtype=np.float32)  # (1+C, 3)
    d = ((a[:, :, None, :] - pal[None, None]) ** 2).sum(-1)  # (H, W, 1+C)
    lab = d.argmin(-1)
    lab[d.min(-1) > 110.0 ** 2] = 0  # far from everything: treat as background
    # 3x3 majority filter (mode) on labels
    k = len(pal)
    onehot = np.eye(k, dtype=np.int16)[lab]  # (H, W, K)
    pad = np.pad(onehot, ((1, 1), (1, 1), (0, 0)))
    votes = sum(pad[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    filt = votes.argmax(-1)
    cell = min(w, h) / 3
    min_area = 0.25 * (2 * HALF["small"] * cell) ** 2
    objs = []
    for ci, cname in enumerate(names, start=1):
        for pix in _components(filt == ci):
            if len(pix) < min_area:
                continue
            comp = np.zeros((h, w), dtype=bool)
            comp[pix[:, 0], pix[:, 1]] = True
            # measure on the unfiltered labels near the component (the filter eats corners)
            y0, x0 = pix.min(0)
            y1, x1 = pix.max(0)
            raw = np.zeros((h, w), dtype=bool)
            sl = (slice(max(0, y0 - 1), y1 + 2), slice(max(0, x0 - 1), x1 + 2))
            raw[sl] = lab[sl] == ci
            shape, size = _match_template(raw | comp, pix, cell)
            cy, cx = (y0 + y1 + 1) / 2, (x0 + x1 + 1) / 2
            objs.append({"shape": shape, "color": cname, "size": size,
                         "x": XS[min(2, int(cx / (w / 3)))], "y": YS[min(2, int(cy / (h / 3)))]})
    objs.sort(key=lambda o: (YS.index(o["y"]), XS.index(o["x"])))
    return objs


def scene_objects(scene: Scene) -> list[dict]:
    """The scene's objects in parse_image's order (row, then column)."""
    objs = [o.attrs() for o in scene.objects]
    objs.sort(key=lambda o: (YS.index(o["y"]), XS.index(o["x"])))
    return objs


def majority_baseline(answers_per_question: list[list[str]]) -> tuple[str, float]:
    """The most frequent canonical answer and its exact-match rate (a quick prior check)."""
    c = Counter(a[0] for a in answers_per_question)
    ans, n = c.most_common(1)[0]
    return ans, n / max(1, len(answers_per_question))
