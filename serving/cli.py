"""`ditserve` command line: generate a video locally, serve (serving/cli_serve.py), check a config.

Every mistake a person can make here (a bad flag, a bad config file, a bad size, a missing
model folder) ends as one line on stderr and exit code 2 — never a stack trace.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from serving.cli_bench import add_bench_command, run_bench
from serving.cli_keys import add_keys_commands, run_keys
from serving.cli_loadtest import add_loadtest_command, run_loadtest
from serving.cli_serve import add_serve_command, serve
from serving.cli_train import add_train_command, run_train_tiny

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (no usage dump)."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ditserve", description="Self-hosted text-to-video serving on Ray Serve.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate one video in this process (no Ray, no HTTP)")
    gen.add_argument("prompt", help="what the video shows")
    gen.add_argument("-o", "--output", type=Path, default=Path("video.mp4"), help="where to write the MP4")
    gen.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16 (preset default if unset)")
    gen.add_argument("--seconds", type=float, help="clip length; seconds x fps must be a multiple of 4")
    gen.add_argument("--fps", type=int, help="frames per second")
    gen.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps")
    gen.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (<=1 turns it off)")
    gen.add_argument("--negative-prompt", help="what the video should not show")
    gen.add_argument("--shift", type=float, help="flow-matching timestep shift")
    gen.add_argument("--seed", type=int, help="random seed (a random one is chosen and printed if unset)")
    gen.add_argument("--image", type=Path, help="the first frame (PNG, JPEG or WebP): image-to-video presets")
    _add_config(gen)

    add_serve_command(sub)

    add_bench_command(sub, _Parser, _add_config)

    add_loadtest_command(sub, _Parser)

    k8s = sub.add_parser("k8s", help="Kubernetes manifests derived from the config")
    k8s_sub = k8s.add_subparsers(dest="k8s", required=True, parser_class=_Parser)
    render = k8s_sub.add_parser("render", help="render a RayService serveConfigV2 patch from a config")
    render.add_argument("--all", action="store_true",
                        help="re-render every generated file under deploy/kubernetes (overlays and monitoring)")
    render.add_argument("-o", "--output", type=Path, help="write the patch here instead of stdout")
    _add_config(render)

    cfg = sub.add_parser("config", help="validate a config file and print the resolved settings")
    _add_config(cfg)

    add_train_command(sub)
    add_keys_commands(sub)
    return parser


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (DITSERVE_<SECTION>__<KEY> env vars override it)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "loadtest":  # talks HTTP only (or starts its own simulated clusters): no config, no models
        return run_loadtest(args, argv)
    if args.command == "keys":  # makes secrets: no config needed
        return run_keys(args)
    if args.command == "train-tiny":  # its own fixed recipe: no config needed
        return run_train_tiny(args)
    if args.command == "bench" and args.bench == "gpu":  # builds its own models: no config needed
        _quiet_libraries()
        return run_bench(args, None, argv)
    from serving.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"ditserve: config error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "config":
        return _config(config)
    if args.command == "serve":
        return serve(args, config)
    if args.command == "bench":
        _quiet_libraries()
        return run_bench(args, config, argv)
    if args.command == "k8s":
        return _k8s(args)
    return _generate(args, config)


def _config(config) -> int:
    import yaml

    from serving.models.loading import ModelFolderError, check_model_folder

    try:
        check_model_folder(config.model)
    except ModelFolderError as exc:
        print(f"ditserve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


# Which flag a request field came from, so a validation error names what the user typed.
_FLAG = {"num_inference_steps": "--steps", "guidance_scale": "--guidance-scale",
         "negative_prompt": "--negative-prompt", "prompt": "PROMPT", "input_reference": "--image"}


def _first_frame(path: Path | None, config):
    """--image read and checked as the API checks input_reference (SpecError naming it); a
    PIL image, or None. An image-to-video preset requires it, a text-to-video one refuses it."""
    import io

    from PIL import Image

    from serving.jobs.reference import FIELD, read_reference
    from serving.models.presets import PRESETS, image_presets
    from serving.pipeline.spec import SpecError

    preset = PRESETS[config.model.preset]
    if path is None:
        if preset.takes_image:
            raise SpecError(FIELD, f"model {preset.name!r} makes video from a first frame: give --image PATH")
        return None
    if not preset.takes_image:
        raise SpecError(FIELD, f"model {preset.name!r} makes video from text only; --image needs an image-to-video "
                               f"preset ({', '.join(image_presets())})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(FIELD, f"cannot read {str(path)!r}: {exc.strerror}") from None
    frame = read_reference(data, config.server.max_image_pixels)
    return Image.open(io.BytesIO(frame.png)).convert("RGB")


def _generate(args, config) -> int:
    _quiet_libraries()
    from serving.models.loading import ModelFolderError, check_model_folder, preset_of
    from serving.pipeline.spec import SpecError, build_spec

    fields = ("size", "seconds", "fps", "num_inference_steps", "guidance_scale", "negative_prompt", "shift", "seed")
    try:
        spec = build_spec(preset_of(config.model), config.generation, args.prompt,
                          **{name: getattr(args, name) for name in fields})
        image = _first_frame(args.image, config)
        check_model_folder(config.model)
    except SpecError as exc:
        flag = _FLAG.get(exc.field, f"--{exc.field.replace('_', '-')}")
        print(f"ditserve generate: error: {flag}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except ModelFolderError as exc:
        print(f"ditserve generate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from serving.pipeline.local import LocalPipeline

    started = time.perf_counter()
    pipeline = LocalPipeline(config)
    loaded = time.perf_counter()

    def progress(step: int, total: int) -> None:
        print(f"\rdenoising {step}/{total}", end="", file=sys.stderr, flush=True)

    interactive = sys.stderr.isatty()
    video = pipeline.generate(spec, on_step=progress if interactive else None, image=image)
    if interactive:
        print(file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(video.mp4)
    done = time.perf_counter()
    print(f"wrote {args.output}: {spec.width}x{spec.height}, {spec.num_frames} frames at {spec.fps} fps "
          f"({spec.seconds:g} s), seed {spec.seed}; load {loaded - started:.1f} s, generate {done - loaded:.1f} s")
    return 0


def _k8s(args) -> int:
    from serving.config import ConfigError
    from serving.k8s import RenderError, rendered_files, serve_config_patch

    try:
        if args.all:
            for path, content in rendered_files().items():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
                print(f"wrote {path}")
            return 0
        if args.config is None:
            print("ditserve k8s render: error: give --config PATH (an overlay's ditserve.yaml) or --all",
                  file=sys.stderr)
            return EXIT_USAGE
        patch = serve_config_patch(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"ditserve: config error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except RenderError as exc:
        print(f"ditserve k8s render: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.output:
        args.output.write_text(patch)
    else:
        print(patch, end="")
    return 0


def _quiet_libraries() -> None:
    # Library chatter (progress bars, dtype advice) is noise for a CLI user.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: we never download


if __name__ == "__main__":
    sys.exit(main())
