"""
scenes.py -- the text-to-image world's data: scenes of 1-4 coloured shapes, drawn small, and their captions in
GenEval's six categories (Ghosh et al. 2023, "GenEval: an object-focused framework for evaluating text-to-image
alignment"), with the parser that reads a caption back into what it asks for.

    python scenes.py    # smoke demo: one caption per category, its spec and scene, and the image as text

A spec says what a caption asks for (JSON-able):
    {'tag': one of TAGS, 'objects': [{'shape': str, 'colour': str or None, 'count': int}, ...],
     'relation': None or one of RELATIONS}          # position: objects[0] <relation> objects[1]
A scene says what an image holds, one dict per object (JSON-able; heldout.npz stores them):
    {'shape': str, 'colour': str, 'box': [x0, y0, x1, y1]}   # floats, pixels of the final image, y down

The categories follow GenEval's templates: colour words appear only where the category tests colour (`colors`,
`color_attr`); two-object, position and colour-attribution prompts name two different shapes; counting asks for
2-4 of one shape. A scene holds exactly what its caption names (no distractors), each unnamed colour drawn at
random. The words of every caption are VOCAB (the text encoder's whole vocabulary); parse() reads any caption of
that grammar, so a person can ask for "three green triangles" or "a red disk to the left of a blue cross" too.

Unseen prompts (GenEval's compositional generalisation): UNSEEN is a fixed rule, not a random draw, so every
world shares it: a colour-shape pair is unseen when (colour index + shape index) % 5 == 0 (one shape per colour,
6 of 30 pairs), and a position triple (shape a, relation, shape b) when (a + b + relation index) % 5 == 0
(16 of 80). The train and held-out splits never caption an unseen combination (their images still show, say,
purple rings, under captions that name no colour); the 'unseen' split captions only prompts that hold one.
"""
import colorsys

import numpy as np
from PIL import Image, ImageDraw

from cli import UserError

SHAPES = ('disk', 'square', 'triangle', 'ring', 'cross')  # the class-to-image world's shapes
PLURALS = ('disks', 'squares', 'triangles', 'rings', 'crosses')
# named colour -> HSV hue; six hues at least 0.07 apart, each drawn with a little jitter (HUE_JITTER), full
# saturation and brightness, so the named colours stay apart after box-filtering against a dim background
COLOURS = {'red': 0.0, 'orange': 0.075, 'yellow': 0.155, 'green': 0.34, 'blue': 0.62, 'purple': 0.78}
COLOUR_NAMES = tuple(COLOURS)
HUE_JITTER = 0.012
TAGS = ('single_object', 'two_object', 'counting', 'colors', 'position', 'color_attr')  # GenEval's own tags
RELATIONS = ('left of', 'right of', 'above', 'below')  # GenEval's relations, objects[0] relative to objects[1]
RELATION_WORDS = {'left of': 'to the left of', 'right of': 'to the right of', 'above': 'above', 'below': 'below'}
NUMBERS = ('a', 'two', 'three', 'four')  # count 1..4; 'an' reads as 'a'
MAX_COUNT = len(NUMBERS)
UNSEEN_TAGS = ('colors', 'position', 'color_attr')  # the categories whose prompts can hold an unseen combination
VOCAB = list(dict.fromkeys(['a', 'an', *NUMBERS[1:], *COLOUR_NAMES, *SHAPES, *PLURALS, 'and',
                            *' '.join(RELATION_WORDS.values()).split()]))  # every word a caption can hold

# -----------------------------------------------------------------------------
# unseen combinations: a documented rule (module docstring)

UNSEEN_PAIRS = frozenset((c, s) for i, c in enumerate(COLOUR_NAMES) for j, s in enumerate(SHAPES) if (i + j) % 5 == 0)
UNSEEN_TRIPLES = frozenset((a, r, b) for i, a in enumerate(SHAPES) for k, r in enumerate(RELATIONS)
                           for j, b in enumerate(SHAPES) if i != j and (i + j + k) % 5 == 0)
UNSEEN = UNSEEN_PAIRS | UNSEEN_TRIPLES  # ('red', 'disk'), ..., ('disk', 'left of', 'cross'), ...


def combinations(spec):
    """The colour-shape pairs and shape-relation-shape triples a spec captions (what UNSEEN is made of)."""
    out = {(o['colour'], o['shape']) for o in spec['objects'] if o['colour']}
    if spec['relation']:
        out.add((spec['objects'][0]['shape'], spec['relation'], spec['objects'][1]['shape']))
    return out


def is_unseen(spec):
    return bool(combinations(spec) & UNSEEN)


# -----------------------------------------------------------------------------
# captions: spec -> words, and back


def phrase(o):  # {'shape', 'colour', 'count'} -> "a red disk", "three triangles", "an orange ring"
    noun = SHAPES.index(o['shape'])
    words = [NUMBERS[o['count'] - 1]] + ([o['colour']] if o['colour'] else []) + \
        [PLURALS[noun] if o['count'] > 1 else SHAPES[noun]]
    if words[0] == 'a' and words[1][0] in 'aeiou':
        words[0] = 'an'
    return ' '.join(words)


def caption(spec):
    """spec -> its caption, e.g. "a red disk to the left of a blue cross"."""
    parts = [phrase(o) for o in spec['objects']]
    if spec['relation']:
        return f"{parts[0]} {RELATION_WORDS[spec['relation']]} {parts[1]}"
    return ' and '.join(parts)


def infer_tag(objects, relation):
    """The GenEval category a parsed caption belongs to (the categories' templates, read backwards)."""
    if relation:
        return 'position'
    if len(objects) == 1:
        return 'counting' if objects[0]['count'] > 1 else 'colors' if objects[0]['colour'] else 'single_object'
    return 'color_attr' if any(o['colour'] for o in objects) else 'two_object'


def parse_phrase(words, text):
    """['three', 'green', 'triangles'] -> {'shape', 'colour', 'count'}; UserError when it is not a phrase."""
    if len(words) not in (2, 3) or words[0] not in NUMBERS + ('an',) or words[-1] not in SHAPES + PLURALS or \
            (len(words) == 3 and words[1] not in COLOURS):
        raise UserError(f"cannot read {' '.join(words)!r} in the prompt {text!r}: say a number ('a', 'two', 'three', "
                        f"'four'), an optional colour and a shape, e.g. 'three green triangles'")
    count = 1 if words[0] == 'an' else NUMBERS.index(words[0]) + 1
    plural = words[-1] in PLURALS
    if plural != (count > 1):
        raise UserError(f"{' '.join(words)!r} in the prompt {text!r}: the number and the noun disagree")
    shape = SHAPES[(PLURALS if plural else SHAPES).index(words[-1])]
    return {'shape': shape, 'colour': words[1] if len(words) == 3 else None, 'count': count}


def canonical(text):
    """A typed prompt as the world's captions are written: lower case, single spaces, no full stop at the end
    ("Two Yellow rings." -> "two yellow rings"). The world's word-level tokenizer knows only these forms: it
    would read "Two" or "." as its unknown token."""
    return ' '.join(text.lower().split()).rstrip('.!? ')


def parse(text):
    """A caption -> its spec (the inverse of caption()). Case, spacing and a closing full stop are free
    (canonical); an unknown word, or words in an order the grammar does not know, raise cli.UserError with one
    sentence naming the problem."""
    words = canonical(text).split()
    for w in words:
        if w not in VOCAB:
            raise UserError(f"unknown word {w!r} in the prompt {text!r}; the world's words are: {' '.join(VOCAB)}")
    joined, relation, parts = ' ' + ' '.join(words) + ' ', None, None
    for r, rw in RELATION_WORDS.items():
        if f' {rw} ' in joined:
            relation, parts = r, joined.split(f' {rw} ')
            break
    if parts is None:
        parts = joined.split(' and ')
    if len(parts) > 2 or not all(p.split() for p in parts):
        raise UserError(f"cannot read the prompt {text!r}: name one or two objects, joined by 'and' or a relation")
    objects = [parse_phrase(p.split(), text) for p in parts]
    if len(objects) == 2 and objects[0]['shape'] == objects[1]['shape']:
        raise UserError(f"the prompt {text!r} names the {objects[0]['shape']} twice; name two different shapes")
    if len(objects) == 2 and max(o['count'] for o in objects) > 1:
        raise UserError(f"the prompt {text!r} counts in a two-object prompt; count one shape alone")
    return {'tag': infer_tag(objects, relation), 'objects': objects, 'relation': relation}


def canonical_prompts(prompts):
    """Typed prompts (a --prompt list or a --prompts file) for a generator of this world: each parsed (an unknown
    word, or words the grammar cannot read, raise UserError naming them) -> their canonical forms."""
    for p in prompts:
        parse(p)
    return [canonical(p) for p in prompts]


# -----------------------------------------------------------------------------
# specs: what a caption of each category asks for


def pick(rng, seq, k=1):  # k distinct items of seq, in random order
    return [seq[i] for i in rng.choice(len(seq), k, replace=False)]


def draw_spec(rng, tag):
    """One spec of the category `tag`, every combination allowed."""
    obj = lambda s, c=None, n=1: {'shape': s, 'colour': c, 'count': n}
    if tag == 'single_object':
        return {'tag': tag, 'objects': [obj(*pick(rng, SHAPES))], 'relation': None}
    if tag == 'counting':
        return {'tag': tag, 'objects': [obj(*pick(rng, SHAPES), n=int(rng.integers(2, MAX_COUNT + 1)))],
                'relation': None}
    if tag == 'colors':
        return {'tag': tag, 'objects': [obj(*pick(rng, SHAPES), *pick(rng, COLOUR_NAMES))], 'relation': None}
    a, b = pick(rng, SHAPES, 2)  # two different shapes
    if tag == 'two_object':
        return {'tag': tag, 'objects': [obj(a), obj(b)], 'relation': None}
    if tag == 'position':
        return {'tag': tag, 'objects': [obj(a), obj(b)], 'relation': pick(rng, RELATIONS)[0]}
    if tag == 'color_attr':
        ca, cb = pick(rng, COLOUR_NAMES, 2)  # two different colours, so a swap is visible
        return {'tag': tag, 'objects': [obj(a, ca), obj(b, cb)], 'relation': None}
    raise ValueError(f"unknown tag {tag!r}; one of {TAGS}")


def sample_spec(rng, tag, split='train'):
    """A random spec of category `tag` (numpy Generator rng). split 'train' or 'heldout': never an UNSEEN
    combination; 'unseen': always one (tags in UNSEEN_TAGS only). Rejection sampling: seen prompts are
    at least 60% of each category, unseen ones at least 20%, so a few draws suffice."""
    if split not in ('train', 'heldout', 'unseen'):
        raise ValueError(f"unknown split {split!r}; 'train', 'heldout' or 'unseen'")
    if split == 'unseen' and tag not in UNSEEN_TAGS:
        raise ValueError(f"the category {tag!r} has no unseen prompts; one of {UNSEEN_TAGS}")
    while True:
        spec = draw_spec(rng, tag)
        if is_unseen(spec) == (split == 'unseen'):
            return spec


# -----------------------------------------------------------------------------
# scenes: where the objects go


SIZE = 24  # the default image side, pixels: the least at which four objects stay legible (README)
RADII = {1: (0.22, 0.34), 2: (0.15, 0.23), 3: (0.13, 0.17), 4: (0.12, 0.155)}  # half-extent / size, by object count
GAP = 0.04  # the least gap between two objects' boxes, / size (objects never overlap)


def apart(p, q, gap):  # (cx, cy, r) twice: are their boxes at least `gap` apart along x or y?
    d = p[2] + q[2] + gap
    return abs(p[0] - q[0]) >= d or abs(p[1] - q[1]) >= d


def clearly(relation, p, q, gap):
    """Does p stand clearly `relation` q? Boxes apart along the relation's axis, on the right side, and the
    offset across the axis at most half the offset along it (GenEval's rule then holds with a wide margin)."""
    axis, sign = {'left of': (0, -1), 'right of': (0, 1), 'above': (1, -1), 'below': (1, 1)}[relation]
    along, across = sign * (p[axis] - q[axis]), abs(p[1 - axis] - q[1 - axis])
    return along >= p[2] + q[2] + gap and across <= 0.5 * along


def place(n, rng, size, relation=None, tries=200):
    """n (cx, cy, r) in pixels: inside the image by half a pixel, boxes apart; with a relation (n = 2), the
    first clearly in that relation to the second. Rejection sampling; radii drawn afresh every `tries`."""
    lo, hi = RADII[n]
    while True:
        r = rng.uniform(lo, hi, n) * size
        for _ in range(tries):
            c = rng.uniform(r[:, None] + 0.5, size - r[:, None] - 0.5, (n, 2))
            pts = [(c[i, 0], c[i, 1], r[i]) for i in range(n)]
            ok = all(apart(pts[i], pts[j], GAP * size) for i in range(n) for j in range(i))
            if ok and (relation is None or clearly(relation, pts[0], pts[1], GAP * size)):
                return pts


def scene_for(spec, rng, size=SIZE):
    """A random scene (list of objects) that satisfies spec: exactly the named objects, each colour the one
    named or a random one, sizes and positions varied, no two boxes overlapping."""
    objs = [(o['shape'], o['colour']) for o in spec['objects'] for _ in range(o['count'])]
    pts = place(len(objs), rng, size, spec['relation'])
    return [{'shape': s, 'colour': c or pick(rng, COLOUR_NAMES)[0],
             'box': [float(cx - r), float(cy - r), float(cx + r), float(cy + r)]}
            for (s, c), (cx, cy, r) in zip(objs, pts)]


# -----------------------------------------------------------------------------
# drawing


def rgb(h, s, v):  # floats in [0, 1] -> an RGB tuple of ints
    return tuple(int(255 * x) for x in colorsys.hsv_to_rgb(h % 1, s, v))


def background(rng, S):
    """(S, S, 3) uint8: a dim, low-saturation gradient, vertical or horizontal (as the class-to-image world's)."""
    ends = np.array([rgb(rng.random(), 0.3 * rng.random(), 0.08 + 0.3 * rng.random()) for _ in range(2)], float)
    t = np.linspace(0, 1, S)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, S)[None, :, None]
    return (ends[0] * (1 - t) + ends[1] * t + np.zeros((S, S, 3))).astype(np.uint8)


def draw_shape(d, shape, box, col, ss):
    """One shape filling box (x0, y0, x1, y1) at the drawing scale, on a PIL ImageDraw."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == 'disk':
        d.ellipse(box, fill=col)
    elif shape == 'square':
        d.rectangle(box, fill=col)
    elif shape == 'triangle':
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=col)
    elif shape == 'ring':
        d.ellipse(box, outline=col, width=max(ss, int(0.42 * r)))
    else:  # cross
        w = 0.36 * r
        d.rectangle([x0, cy - w, x1, cy + w], fill=col)
        d.rectangle([cx - w, y0, cx + w, y1], fill=col)


def draw_scene(objects, rng, size=SIZE, ss=4):
    """The scene as a (size, size, 3) uint8 image, drawn at ss x the size and box-filtered down (as the
    class-to-image world's images); each named colour with a little jitter in hue, saturation and value."""
    S = size * ss
    img = Image.fromarray(background(rng, S))
    d = ImageDraw.Draw(img)
    for o in objects:
        col = rgb(COLOURS[o['colour']] + rng.uniform(-HUE_JITTER, HUE_JITTER), rng.uniform(0.8, 1.0),
                  rng.uniform(0.85, 1.0))
        draw_shape(d, o['shape'], [v * ss for v in o['box']], col, ss)
    return np.asarray(img.resize((size, size), Image.BOX))


def make_split(n, seed, size=SIZE, split='train'):
    """n captioned images from the random stream `seed` (an int or a list of ints), categories balanced (TAGS,
    or UNSEEN_TAGS for split 'unseen') -> (images (n, size, size, 3) uint8, captions [str], specs [dict],
    scenes [[dict]])."""
    rng = np.random.default_rng(seed)
    tags = UNSEEN_TAGS if split == 'unseen' else TAGS
    order = np.arange(n) % len(tags)
    rng.shuffle(order)
    specs = [sample_spec(rng, tags[t], split) for t in order]
    scenes = [scene_for(s, rng, size) for s in specs]
    images = np.stack([draw_scene(sc, rng, size) for sc in scenes]) if n else np.zeros((0, size, size, 3), np.uint8)
    return images, [caption(s) for s in specs], specs, scenes


# -----------------------------------------------------------------------------


def as_text(img):
    """A uint8 image as lines of characters, one per pixel, by its nearest named colour (. = background)."""
    hsv = np.array([colorsys.rgb_to_hsv(*(p / 255)) for p in img.reshape(-1, 3)])
    hues = np.array(list(COLOURS.values()))
    dist = np.abs((hsv[:, :1] - hues[None] + 0.5) % 1 - 0.5)
    ch = np.array([c[0].upper() if c != 'purple' else 'P' for c in COLOUR_NAMES])[dist.argmin(1)]
    ch = np.where((hsv[:, 1] > 0.5) & (hsv[:, 2] > 0.5), ch, '.')
    return '\n'.join(''.join(row) for row in ch.reshape(img.shape[:2]))


if __name__ == '__main__':
    images, caps, specs, scenes = make_split(len(TAGS), seed=0)
    for img, cap, spec, sc in zip(images, caps, specs, scenes):
        assert parse(cap) == spec, (cap, spec)
        print(f"{spec['tag']:>13}: {cap!r}")
        print('   ', sc)
        print(as_text(img), '\n')
    print(f"{len(VOCAB)} words: {' '.join(VOCAB)}")
    print(f"unseen: {len(UNSEEN_PAIRS)} colour-shape pairs {sorted(UNSEEN_PAIRS)}, {len(UNSEEN_TRIPLES)} relations")
    try:
        parse("a pink disk")
    except UserError as e:
        print("parse('a pink disk') ->", e)
