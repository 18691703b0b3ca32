"""Tests of scenes.py: captions and their parser, specs per split, scenes that satisfy their specs, splits."""
import colorsys

import numpy as np
import pytest

import scenes
from cli import UserError
from scenes import TAGS, UNSEEN, UNSEEN_TAGS, caption, make_split, parse, sample_spec, scene_for


def specs_of_every_kind(n=40, seed=0):
    rng = np.random.default_rng(seed)
    out = [sample_spec(rng, t, 'train') for t in TAGS for _ in range(n)]
    return out + [sample_spec(rng, t, 'unseen') for t in UNSEEN_TAGS for _ in range(n)]


def test_caption_parse_round_trip_every_tag():
    specs = specs_of_every_kind()
    for s in specs:
        assert parse(caption(s)) == s
        assert parse('  ' + caption(s).upper() + ' ') == s  # case and spacing are free
    assert {s['tag'] for s in specs} == set(TAGS)
    # VOCAB is exactly the words captions use ('an' before orange; 'a' elsewhere)
    used = {w for s in specs for w in caption(s).split()}
    assert used == set(scenes.VOCAB)


def test_parse_reads_colours_anywhere_the_grammar_allows():
    s = parse("a red disk to the left of a blue cross")
    assert s == {'tag': 'position', 'relation': 'left of', 'objects': [
        {'shape': 'disk', 'colour': 'red', 'count': 1}, {'shape': 'cross', 'colour': 'blue', 'count': 1}]}
    assert parse("three green triangles")['objects'] == [{'shape': 'triangle', 'colour': 'green', 'count': 3}]
    assert caption(parse("an orange ring below a square")) == "an orange ring below a square"


@pytest.mark.parametrize('text, needle', [
    ("a pink disk", "'pink'"), ("a red dog", "'dog'"), ("two disk", "disagree"), ("a disk and a disk", "twice"),
    ("red disk", "cannot read"), ("a disk and a square and a ring", "cannot read"), ("", "cannot read"),
    ("two disks and a ring", "two-object"), ("a disk to the left of", "cannot read")])
def test_bad_prompts_are_one_sentence(text, needle):
    with pytest.raises(UserError) as e:
        parse(text)
    assert needle in str(e.value) and '\n' not in str(e.value)


def ground_truth_holds(spec, scene, size):
    """An independent reading of a scene: counts per shape, named colours, relation by box centres."""
    want = {o['shape']: o for o in spec['objects']}
    if sorted(o['shape'] for o in scene) != sorted(s for s, o in want.items() for _ in range(o['count'])):
        return False
    if any(want[o['shape']]['colour'] not in (None, o['colour']) for o in scene):
        return False
    for o in scene:
        x0, y0, x1, y1 = o['box']
        if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
            return False
    if spec['relation']:
        (ax, ay), (bx, by) = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in (scene[0]['box'], scene[1]['box'])]
        dx, dy = ax - bx, ay - by
        sign = {'left of': dx < -abs(dy), 'right of': dx > abs(dy), 'above': dy < -abs(dx), 'below': dy > abs(dx)}
        return sign[spec['relation']]
    return True


@pytest.mark.parametrize('size', [24, 32])
def test_scene_for_satisfies_its_spec_and_objects_do_not_overlap(size):
    rng = np.random.default_rng(1)
    for spec in specs_of_every_kind(20, seed=1):
        sc = scene_for(spec, rng, size)
        assert ground_truth_holds(spec, sc, size), (spec, sc)
        for i in range(len(sc)):
            for j in range(i):
                a, b = sc[i]['box'], sc[j]['box']
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]  # boxes disjoint


def test_ground_truth_check_can_fail():  # the checker above is not vacuous: a swapped scene fails it
    spec = parse("a red disk to the left of a blue cross")
    sc = scene_for(spec, np.random.default_rng(0), 32)
    assert ground_truth_holds(spec, sc, 32)
    assert not ground_truth_holds(spec, sc[::-1], 32)
    assert not ground_truth_holds(spec, [dict(sc[0], colour='blue'), sc[1]], 32)


def test_make_split_balanced_and_deterministic():
    a = make_split(60, 5, 24)
    b = make_split(60, 5, 24)
    c = make_split(60, 6, 24)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (60, 24, 24, 3) and a[0].dtype == np.uint8
    counts = [sum(s['tag'] == t for s in a[2]) for t in TAGS]
    assert counts == [10] * 6
    assert [caption(s) for s in a[2]] == a[1]
    u = make_split(30, 5, 24, 'unseen')
    assert [sum(s['tag'] == t for s in u[2]) for t in UNSEEN_TAGS] == [10] * 3


def test_unseen_never_in_train_and_only_in_unseen():
    _, _, train, _ = make_split(600, 0, 24, 'train')
    _, _, held, _ = make_split(300, 1, 24, 'heldout')
    _, _, unseen, _ = make_split(300, 2, 24, 'unseen')
    assert not any(scenes.combinations(s) & UNSEEN for s in train + held)
    assert all(scenes.combinations(s) & UNSEEN for s in unseen)
    # the rule: each colour has one unseen shape; a fifth of the position triples are unseen
    assert sorted(c for c, _ in scenes.UNSEEN_PAIRS) == sorted(scenes.COLOUR_NAMES)
    assert len(scenes.UNSEEN_TRIPLES) == 4 * len(scenes.RELATIONS)
    seen = {p for s in train for p in scenes.combinations(s)}  # train captions every seen colour-shape pair
    assert len({p for p in seen if len(p) == 2}) == len(scenes.COLOURS) * len(scenes.SHAPES) - len(scenes.UNSEEN_PAIRS)


def test_named_colours_stay_apart_after_box_filtering():
    """Each object's inner pixels, after drawing at 4x and box-filtering, are nearest in hue to its own colour."""
    rng = np.random.default_rng(3)
    hues = np.array(list(scenes.COLOURS.values()))
    for colour in scenes.COLOURS:
        for shape in ('disk', 'square'):
            for _ in range(10):
                spec = {'tag': 'colors', 'objects': [{'shape': shape, 'colour': colour, 'count': 1}],
                        'relation': None}
                sc = scene_for(spec, rng, 24)
                img = scenes.draw_scene(sc, rng, 24)
                x0, y0, x1, y1 = sc[0]['box']
                cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
                h = colorsys.rgb_to_hsv(*(img[cy, cx] / 255))[0]
                assert scenes.COLOUR_NAMES[np.abs((h - hues + 0.5) % 1 - 0.5).argmin()] == colour
