"""`ditserve bench ...`: benchmarks that print tables (serving/bench/)."""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_USAGE = 2
# Kept here, not imported from serving.bench.gpu: building the parser must not import torch or
# diffusers (they import ssl, which `ditserve loadtest`'s gevent must patch first).
GPU_SECTIONS = ("attention", "dit", "stages", "profile")
GPU_SIZES = ("real", "tiny")  # serving/bench/gpu_sizes.py SIZES


def add_gpu_arguments(parser) -> None:
    parser.add_argument("--sizes", choices=GPU_SIZES, default=None,
                        help="real (Wan shapes; the default on a GPU) or tiny (the default on a CPU)")
    parser.add_argument("--record", type=Path, default=None,
                        help="append the report here (default on a GPU: docs/benchmarks.md; on a CPU: nowhere)")
    parser.add_argument("--profile-out", type=Path, default=None,
                        help="write the measured cost profile JSON here (default on a GPU: "
                             "docs/profiles/<gpu>-<preset>-measured.json)")
    parser.add_argument("--only", default=",".join(GPU_SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(GPU_SECTIONS)} (default: all)")


def add_bench_command(sub, parser_class, add_config) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print tables")
    kinds = bench.add_subparsers(dest="bench", required=True, parser_class=parser_class)
    engine = kinds.add_parser("engine", help="N concurrent jobs: one at a time vs the batching engine")
    engine.add_argument("--jobs", type=int, default=8, help="concurrent jobs (default 8)")
    engine.add_argument("--steps", type=int, default=20, help="denoising steps per job (default 20)")
    engine.add_argument("--size", default=None, help="WIDTHxHEIGHT (preset default if unset)")
    engine.add_argument("--seconds", type=float, default=None, help="clip length (preset default if unset)")
    engine.add_argument("--max-batch", type=int, default=None, help="engine batch (default: --jobs)")
    engine.add_argument("--cache", default="off", help="comma-separated step-cache settings to compare, e.g. "
                                                       "off,balanced,fast (default off)")
    add_config(engine)
    cache = kinds.add_parser("cache", help="step caching: DiT forwards saved vs fidelity (latent error, PSNR, "
                                           "held-out semantic score) against uncached, on the tiny model")
    cache.add_argument("--cache", default="balanced,fast", help="settings compared with off (default balanced,fast)")
    cache.add_argument("--steps", type=int, default=20, help="denoising steps per video (default 20)")
    cache.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per prompt (default 0 1 2)")
    add_config(cache)
    parallel = kinds.add_parser("parallel", help="one DiT forward's time vs the gang's layout (sequence and CFG "
                                                  "parallel ranks, serving/parallel/), in local processes")
    parallel.add_argument("--layouts", default=None,
                          help="comma-separated ULYSSES:CFG:THREADS per rank, the first the reference "
                               "(default on a CPU: 1:1:1,1:1:2,2:1:1,1:2:1; on GPUs: 1:1:1,2:1:1,... up to the GPUs)")
    parallel.add_argument("--size", default="256x256", help="WIDTHxHEIGHT (default 256x256)")
    parallel.add_argument("--frames", type=int, default=33, help="frames, 4n+1 (default 33)")
    parallel.add_argument("--rows", type=int, default=2, help="batch rows (a guided request is 2; default 2)")
    parallel.add_argument("--repeats", type=int, default=3, help="timed forwards, median kept (default 3)")
    add_config(parallel)
    attention = kinds.add_parser("attention", help="GPU: attention TFLOP/s, our Triton kernel vs SDPA vs xformers, "
                                                    "and the DiT per backend (bench gpu --only attention,dit)")
    attention.add_argument("--record", type=Path, default=Path("docs/benchmarks.md"),
                           help="append the table here (default docs/benchmarks.md)")
    add_config(attention)
    profile = kinds.add_parser("profile", help="measure a cost profile (simulated accelerators) on this device")
    profile.add_argument("--out", type=Path, default=None, help="write the profile JSON here (default: stdout)")
    profile.add_argument("--name", default=None, help="profile name (default: PRESET-DEVICE, e.g. tiny-cpu)")
    profile.add_argument("--repeats", type=int, default=3, help="timed calls per shape, median kept (default 3)")
    add_config(profile)

    gpu = kinds.add_parser("gpu", help="every GPU figure in one run: attention, DiT, VAE, text encoder, a profile "
                                      "(tiny sizes on a CPU)")
    add_gpu_arguments(gpu)


def run_bench(args, config, argv: list[str] | None = None) -> int:
    if args.bench == "attention":
        import torch

        if not torch.cuda.is_available():
            print("ditserve bench attention: error: needs a CUDA GPU, and there is none here", file=sys.stderr)
            return EXIT_USAGE
        from serving.bench.gpu import run

        print(run("ditserve bench attention", "real", args.record, None, ("attention", "dit")))
        return 0
    if args.bench == "profile":
        return _bench_profile(args, config)
    if args.bench == "gpu":
        from serving.bench.gpu import run_from_args

        return run_from_args(args, "ditserve " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.bench == "cache":
        return _bench_cache(args, config)
    if args.bench == "parallel":
        return _bench_parallel(args, config)
    from serving.bench.engine import bench_engine, report
    from serving.models.loading import resolve_device
    from serving.pipeline.spec import SpecError

    if args.jobs < 1 or args.steps < 1 or (args.max_batch is not None and args.max_batch < 1):
        print("ditserve bench engine: error: --jobs, --steps and --max-batch must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        results = bench_engine(config, args.jobs, args.steps, args.size, args.seconds, args.max_batch,
                               tuple(c.strip() for c in args.cache.split(",") if c.strip()) or ("off",))
    except SpecError as exc:
        print(f"ditserve bench engine: error: --{exc.field.replace('_', '-')}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    print(report(results, str(resolve_device(config.model))))
    return 0


def _bench_cache(args, config) -> int:
    from serving.bench.cache import bench_cache, report
    from serving.models.loading import resolve_device
    from serving.pipeline.spec import SpecError

    if args.steps < 1 or not args.seeds:
        print("ditserve bench cache: error: --steps must be at least 1 and --seeds not empty", file=sys.stderr)
        return EXIT_USAGE
    settings = [c.strip() for c in args.cache.split(",") if c.strip()]
    try:
        results = bench_cache(config, settings, args.steps, args.seeds,
                              log=lambda line: print(line, file=sys.stderr, flush=True))
    except SpecError as exc:
        print(f"ditserve bench cache: error: --{exc.field.replace('_', '-')}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    print(report(results, str(resolve_device(config.model)), args.steps))
    return 0


def _default_layouts() -> str:
    import torch

    if not torch.cuda.is_available():
        return "1:1:1,1:1:2,2:1:1,1:2:1"
    gpus = torch.cuda.device_count()
    return ",".join(f"{d}:1:1" for d in (1, 2, 4, 8) if d <= gpus) + (",2:2:1" if gpus >= 4 else "")


def _bench_parallel(args, config) -> int:
    from serving.bench.parallel import bench_parallel, report
    from serving.models.loading import resolve_device
    from serving.pipeline.spec import SpecError

    try:
        layouts = [tuple(int(n) for n in item.split(":")) for item in (args.layouts or _default_layouts()).split(",")]
        if not layouts or any(len(lay) != 3 or min(lay) < 1 for lay in layouts):
            raise ValueError
    except ValueError:
        print("ditserve bench parallel: error: --layouts: expected ULYSSES:CFG:THREADS items such as 2:1:1",
              file=sys.stderr)
        return EXIT_USAGE
    if args.rows < 1 or args.repeats < 1:
        print("ditserve bench parallel: error: --rows and --repeats must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        results = bench_parallel(config, layouts, args.size, args.frames, args.rows, args.repeats,
                                 log=lambda line: print(line, file=sys.stderr, flush=True))
    except SpecError as exc:
        field = {"num_frames": "frames"}.get(exc.field, exc.field)
        print(f"ditserve bench parallel: error: --{field}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    print(report(results, str(resolve_device(config.model)), args.rows, f"{args.size} x {args.frames} frames",
                 args.repeats))
    return 0


def _bench_profile(args, config) -> int:
    from serving.bench.profile import measure

    if args.repeats < 1:
        print("ditserve bench profile: error: --repeats must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    log = (lambda line: print(line, file=sys.stderr, flush=True))
    profile = measure(config, repeats=args.repeats, name=args.name, log=log)
    text = profile.model_dump_json(indent=2) + "\n"
    if args.out is None:
        print(text, end="")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}: cost profile {profile.name!r} on {profile.device}", file=sys.stderr)
    return 0
