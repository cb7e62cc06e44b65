"""Does a clip made from a first frame start from that frame and move the way asked?
The `tiny-i2v` counterpart of serving/models/semantic.py.

A case is a held-out (colour, shape, direction) combination (synthetic.HELD_OUT: never in
training, as image or as caption) with a first frame rendered for it from a seed, and the
prompt naming it. A generated clip passes when:

- first frame: its first frame shows the reference's object: the same dominant palette
  colour, its centroid within FIRST_FRAME_DISTANCE px of the reference's, its area within
  AREA_RATIO of the reference's (a smear or a vanished object fails);
- motion: semantic.judge's colour-and-direction check over the whole clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from serving.models import semantic, synthetic

FIRST_FRAME_DISTANCE = 4.0  # px, on 64x64 frames (objects are 14-22 px across)
AREA_RATIO = 2.0  # the first frame's object covers between 1/2 and 2x the reference's pixels
CASE_SEED_BASE = 10_000  # first frames for the cases are drawn apart from the training clips' seed


@dataclass(frozen=True)
class Case:
    prompt: str
    colour: str
    shape: str
    direction: str
    seed: int  # the first frame's and the generation's
    frame: torch.Tensor  # uint8 (H, W, 3)

    def image(self) -> Image.Image:
        return Image.fromarray(self.frame.numpy(), mode="RGB")


def held_out_cases(seeds=(0, 1, 2), direction_only: bool = False) -> list[Case]:
    """One case per held-out combination and seed. `direction_only`: the prompt names only
    the direction ("a shape moving left"), the frame shows the rest."""
    cases = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(CASE_SEED_BASE + seed)
        for c, s, d in synthetic.held_out_combos():
            frame = synthetic.render_clip(c, s, d, generator, num_frames=2)[0]
            prompt = synthetic.caption(None, None, d) if direction_only else synthetic.caption(c, s, d)
            cases.append(Case(prompt, c, s, d, seed, frame))
    return cases


def _object(frame: torch.Tensor, colour: str) -> tuple[float, float, int] | None:
    """(cx, cy, pixels) of the pixels of palette colour `colour` in one frame, or None."""
    labels = semantic.palette_labels(frame.unsqueeze(0))[0]
    mask = labels == list(synthetic.COLOURS).index(colour)
    ys, xs = mask.nonzero(as_tuple=True)
    if len(ys) < 5:
        return None
    return xs.float().mean().item(), ys.float().mean().item(), len(ys)


@dataclass(frozen=True)
class Verdict:
    first_frame_ok: bool
    first_frame_offset: float | None  # px between the objects' centroids
    motion: semantic.Judgement

    @property
    def ok(self) -> bool:
        return self.first_frame_ok and self.motion.ok


def judge(frames: torch.Tensor, case: Case) -> Verdict:
    """frames: the generated clip, uint8 (T, H, W, 3), at the case frame's size."""
    motion = semantic.judge(frames, case.colour, case.direction)
    reference, seen = _object(case.frame, case.colour), _object(frames[0], case.colour)
    if reference is None or seen is None or motion.dominant != case.colour:
        return Verdict(False, None, motion)
    offset = ((seen[0] - reference[0]) ** 2 + (seen[1] - reference[1]) ** 2) ** 0.5
    ok = offset <= FIRST_FRAME_DISTANCE and 1 / AREA_RATIO <= seen[2] / reference[2] <= AREA_RATIO
    return Verdict(ok, offset, motion)


@dataclass(frozen=True)
class Score:
    correct: int
    first_frame_correct: int
    motion_correct: int
    total: int
    results: list[dict]

    @property
    def fraction(self) -> float:
        return self.correct / self.total if self.total else 0.0


def score(verdicts: list[tuple[Case, Verdict]]) -> Score:
    results = [dict(prompt=c.prompt, seed=c.seed, shape=c.shape, ok=v.ok, first_frame_ok=v.first_frame_ok,
                    first_frame_offset=v.first_frame_offset, dominant=v.motion.dominant,
                    displacement=v.motion.displacement, motion_ok=v.motion.ok) for c, v in verdicts]
    return Score(correct=sum(r["ok"] for r in results), first_frame_correct=sum(r["first_frame_ok"] for r in results),
                 motion_correct=sum(r["motion_ok"] for r in results), total=len(results), results=results)


def score_pipeline(pipeline, cases: list[Case], **spec_overrides) -> Score:
    """Generate every case with `pipeline` (a LocalPipeline of an I2V preset) and judge it."""
    verdicts = []
    for case in cases:
        spec = pipeline.spec(case.prompt, seed=case.seed, **spec_overrides)
        verdicts.append((case, judge(pipeline.generate(spec, image=case.image()).frames, case)))
    return score(verdicts)


def report(name: str, result: Score) -> str:
    lines = [f"{name}: {result.correct}/{result.total} = {result.fraction:.0%} (first frame "
             f"{result.first_frame_correct}/{result.total}, motion {result.motion_correct}/{result.total})"]
    for r in result.results:
        moved = r["displacement"] and tuple(round(v, 1) for v in r["displacement"])
        offset = None if r["first_frame_offset"] is None else round(r["first_frame_offset"], 1)
        lines.append(f"  {'ok  ' if r['ok'] else 'MISS'} seed {r['seed']} {r['prompt']!r} ({r['shape']}): "
                     f"first frame off by {offset} px, saw {r['dominant']}, moved {moved}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from serving.config import load_config
    from serving.pipeline.local import LocalPipeline

    parser = argparse.ArgumentParser(description="Held-out score of an image-to-video tiny model")
    parser.add_argument("--path", default=None, help="diffusers folder (default: the shipped tiny-i2v)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--direction-only", action="store_true", help="prompts name only the direction")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    environ = {"DITSERVE_MODEL__PRESET": "tiny-i2v", "DITSERVE_MODEL__DEVICE": "cpu"}
    if args.path:
        environ["DITSERVE_MODEL__PATH"] = args.path
    pipeline = LocalPipeline(load_config(None, environ=environ))
    print(report("tiny-i2v, held-out first frames", score_pipeline(
        pipeline, held_out_cases(args.seeds, direction_only=args.direction_only))))


if __name__ == "__main__":
    main()
