"""The shipped `tiny` model against the semantic check of issue #10: for colour x shape x
direction combinations held out of its training, is the generated clip's dominant colour
the one asked for, and does that colour's centroid move the way asked?

The issue's goal is 80 % of held-out prompts; the shipped model scores 33/36 = 92 % on
these (docs/tiny-model.md), so the test asserts the goal itself, and that `tiny-random`
fails the same check by far."""

from __future__ import annotations

from serving.models import semantic

ISSUE_GOAL = 0.8


def report(name: str, score: semantic.Score) -> None:
    print(f"\n{name}: {score.correct}/{score.total} = {score.fraction:.0%} "
          f"(colour {score.colour_correct}/{score.total}, motion {score.direction_correct}/{score.total}; "
          f"issue goal {ISSUE_GOAL:.0%})")
    for r in score.results:
        moved = r["displacement"] and tuple(round(v, 1) for v in r["displacement"])
        print(f"  {'ok  ' if r['ok'] else 'MISS'} seed {r['seed']} {r['prompt']!r}: saw {r['dominant']}, moved {moved}")


def test_trained_tiny_model_on_held_out_prompts():
    score = semantic.held_out_score({"DITSERVE_MODEL__PRESET": "tiny", "DITSERVE_MODEL__DEVICE": "cpu"},
                                    seeds=(0, 1, 2))
    report("tiny, held-out prompts", score)
    assert score.total == 3 * len(semantic.held_out_prompts())
    assert score.fraction >= ISSUE_GOAL


def test_random_weights_fail_the_same_check():
    score = semantic.held_out_score({"DITSERVE_MODEL__PRESET": "tiny-random", "DITSERVE_MODEL__DEVICE": "cpu"},
                                    seeds=(0,))
    report("tiny-random, held-out prompts", score)
    assert score.fraction < 0.2
