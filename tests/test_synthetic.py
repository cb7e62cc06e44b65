"""The synthetic training data of the tiny model (serving/models/synthetic.py) and the pixel
judge that scores generated clips (serving/models/semantic.py), checked on clips whose
truth is known."""

from __future__ import annotations

import pytest
import torch

from serving.models import semantic, synthetic


def test_captions_say_each_attribute_in_every_phrasing():
    for v in range(synthetic.NUM_PHRASINGS):
        full = synthetic.caption("yellow", "diamond", "down", v)
        assert "yellow" in full and "diamond" in full and full != synthetic.caption("yellow", "diamond", "up", v)
    assert synthetic.caption("red", "circle", "right") == "a red circle moving right"
    assert len(set(synthetic.captions("red", "circle", "right"))) == synthetic.NUM_PHRASINGS


def test_partial_captions_leave_out_what_is_unsaid():
    assert synthetic.caption("red", None, None) == "a red shape"
    assert synthetic.caption(None, "circle", "up", 1) == "a circle that moves upward"
    assert synthetic.caption(None, None, "staying", 2) == "shape not moving"
    for colour in synthetic.COLOURS:
        assert colour not in synthetic.caption(None, "square", "left")


def test_held_out_combinations_never_reach_training_but_their_words_do():
    train = set(synthetic.train_combos())
    assert not train & set(synthetic.HELD_OUT)
    assert len(train) + len(synthetic.HELD_OUT) == len(synthetic.all_combos())
    clips = synthetic.make_clips(len(train), seed=3)
    assert {(c.colour, c.shape, c.direction) for c in clips} == train
    for i, names in enumerate((synthetic.COLOURS, synthetic.SHAPES, synthetic.DIRECTIONS)):
        assert {combo[i] for combo in train} == set(names)


def test_clips_are_a_function_of_the_seed():
    a, b, c = (synthetic.make_clips(4, seed) for seed in (5, 5, 6))
    assert all(torch.equal(x.frames, y.frames) for x, y in zip(a, b))
    assert not all(torch.equal(x.frames, z.frames) for x, z in zip(a, c))
    assert a[0].frames.shape == (synthetic.NUM_FRAMES, synthetic.SIZE, synthetic.SIZE, 3)
    assert a[0].frames.dtype == torch.uint8


@pytest.fixture(scope="module")
def truth_clips():
    """Ground-truth clips of every combination (held-out ones included), two of each."""
    return synthetic.make_clips(2 * len(synthetic.all_combos()), seed=11, combos=synthetic.all_combos())


def test_judge_accepts_every_true_clip(truth_clips):
    verdicts = [semantic.judge(c.frames, c.colour, c.direction) for c in truth_clips]
    wrong = [(c.colour, c.shape, c.direction, v.dominant, v.displacement)
             for c, v in zip(truth_clips, verdicts) if not v.ok]
    assert not wrong


def test_judge_rejects_the_wrong_colour_or_direction(truth_clips):
    for clip in truth_clips[:40]:
        other_colour = next(c for c in synthetic.COLOURS if c != clip.colour)
        assert not semantic.judge(clip.frames, other_colour, clip.direction).colour_ok
        for direction in synthetic.DIRECTIONS:
            if direction != clip.direction:
                assert not semantic.judge(clip.frames, clip.colour, direction).direction_ok, (clip, direction)


def test_judge_sees_no_object_in_an_empty_clip():
    empty = torch.full((synthetic.NUM_FRAMES, 64, 64, 3), 20, dtype=torch.uint8)
    verdict = semantic.judge(empty, "red", "left")
    assert verdict.dominant is None and not verdict.ok


def test_judge_names_the_field_it_cannot_read():
    frames = torch.zeros(3, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="colour 'purple'"):
        semantic.judge(frames, "purple", "left")
    with pytest.raises(ValueError, match="direction 'sideways'"):
        semantic.judge(frames, "red", "sideways")
