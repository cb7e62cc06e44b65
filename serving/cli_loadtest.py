"""`ditserve loadtest`: replay a traffic profile against a running service (loadtests/runner.py);
`ditserve loadtest experiment`: the peak-hour experiment on simulated GPUs, three arms
(loadtests/experiment.py); `ditserve loadtest ceiling`: the control plane's ceiling on simulated
GPUs (loadtests/ceiling.py). All need the `loadtest` extra; none loads a model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def add_loadtest_command(sub, parser_class) -> None:
    load = sub.add_parser("loadtest", help="replay a traffic profile against a running service (Locust, headless)")
    load.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default http://127.0.0.1:8000)")
    load.add_argument("--profile", choices=["steady", "ramp", "peak-hour"], default="peak-hour")
    load.add_argument("--minutes", type=float, default=2.0, help="length of the profile (default 2)")
    load.add_argument("--out", type=Path, default=Path("loadtest-report"), help="report folder")
    load.add_argument("--rate", type=float, default=6.0, help="base arrival rate, jobs per minute (default 6)")
    load.add_argument("--size", default="64x64")
    load.add_argument("--seconds", default="1")
    load.add_argument("--steps", type=int, default=8)
    load.add_argument("--metrics-url", default="http://127.0.0.1:8080/metrics",
                      help="Ray's Prometheus endpoint, for the Denoiser replica count ('' to skip)")
    load.add_argument("--application", default="ditserve", help="Serve application name (for replica counts)")
    load.epilog = "With API keys on, put the key in DITSERVE_API_KEY (not on the command line, where ps shows it)."

    kinds = load.add_subparsers(dest="loadtest", required=False, parser_class=parser_class)
    exp = kinds.add_parser(
        "experiment", help="the seeded peak hour against fixed-base, fixed-peak and autoscaling arms, each on a fresh "
        "simulated GPU cluster (SIMULATED: no model runs)")
    exp.add_argument("--simulate", metavar="PROFILE", required=True,
                     help="cost profile (h100-wan2.1-1.3b, h100-wan2.1-14b, tiny-cpu) or a profile JSON path")
    exp.add_argument("--gpus", type=int, default=16, help="simulated GPUs: the budget every arm fits (default 16)")
    exp.add_argument("--nodes", type=int, default=4, help="simulated GPU nodes (default 4)")
    exp.add_argument("--minutes", type=float, default=20.0,
                     help="the peak hour's length, uncompressed minutes (default 20: the burst rises in 2)")
    exp.add_argument("--out", type=Path, required=True, help="report folder")
    exp.add_argument("--time-scale", type=float, default=10.0,
                     help="compress every time by this factor (default 10); reports show uncompressed seconds")
    exp.add_argument("--seed", type=int, default=0, help="seed of the arrival schedule (default 0)")
    exp.add_argument("--slo-seconds", type=float, default=60.0,
                     help="queue-wait SLO, submitted -> denoising starts, uncompressed (default 60)")
    exp.add_argument("--target-seconds", type=float, default=None,
                     help="the autoscaling arm's queue-wait target, uncompressed (default: half the SLO)")
    exp.add_argument("--cache", default="off",
                     help="step caching the jobs ask for (off, balanced, fast; the profile's measured skip rate "
                          "sets what they save); arms are sized for uncached jobs (default off)")
    exp.add_argument("--arms", default="fixed-base,fixed-peak,autoscaling",
                     help="comma-separated arms to run, in order (default all three)")
    exp.add_argument("--node-autoscaling", action="store_true",
                     help="the autoscaling arm's cluster scales its GPU nodes too (Ray's autoscaler; each node joins "
                          "after the profile's node_startup_seconds), from the nodes its minimum needs to --nodes")

    ceiling = kinds.add_parser(
        "ceiling", help="how much load one Director drives before orchestration adds 2 %% to a job's latency: a "
        "closed loop at each time scale, each on a fresh simulated GPU cluster (SIMULATED: no model runs)")
    ceiling.add_argument("--simulate", metavar="PROFILE", required=True,
                         help="cost profile (h100-wan2.1-1.3b, h100-wan2.1-14b, tiny-cpu) or a profile JSON path")
    ceiling.add_argument("--replicas", type=int, default=8,
                         help="Denoisers, one client each; text encoders and VAE decoders: a quarter of it, rounded "
                         "up (default 8)")
    ceiling.add_argument("--time-scales", default="1,4,16",
                         help="comma-separated time scales, one point each: N replicas at X stand for N x X GPUs "
                         "for the control plane (default 1,4,16)")
    ceiling.add_argument("--minutes", type=float, default=10.0,
                         help="closed-loop length per point, uncompressed minutes (default 10)")
    ceiling.add_argument("--nodes", type=int, default=None,
                         help="simulated GPU nodes (default: the GPUs in nodes of 8)")
    ceiling.add_argument("--job-store-url", default=None,
                         help="a Postgres server (postgresql+psycopg://USER@HOST:PORT/DB; the password in PGPASSWORD): "
                         "each point gets a fresh database on it, dropped after. Default: SQLite in the point's folder")
    ceiling.add_argument("--out", type=Path, required=True, help="report folder")


def run_loadtest(args, argv: list[str] | None = None) -> int:
    try:
        if args.loadtest == "experiment":
            from loadtests.experiment import ARM_NAMES  # noqa: F401  (fails early without the extra)
            import matplotlib  # noqa: F401
        elif args.loadtest == "ceiling":
            from loadtests.ceiling import run_ceiling  # noqa: F401
        else:
            from loadtests.runner import run  # noqa: F401
    except ImportError as exc:
        print(f"ditserve loadtest: error: {exc.name} is not installed; pip install 'ditserve[loadtest]'",
              file=sys.stderr)
        return EXIT_USAGE
    if args.loadtest == "experiment":
        return _experiment(args, argv)
    if args.loadtest == "ceiling":
        return _ceiling(args, argv)
    if args.minutes <= 0 or args.rate <= 0 or args.steps < 1:
        print("ditserve loadtest: error: --minutes and --rate must be positive, --steps at least 1", file=sys.stderr)
        return EXIT_USAGE
    from loadtests.runner import run

    summary = run(args.url.rstrip("/"), args.profile, args.minutes, args.out, args.rate, args.size, args.seconds,
                  args.steps, args.metrics_url or None, args.application,
                  api_key=os.environ.get("DITSERVE_API_KEY") or None)
    print(json.dumps(summary, indent=2))
    return 0


def _experiment(args, argv: list[str] | None) -> int:
    from pydantic import ValidationError

    from loadtests.experiment import ARM_NAMES, command_line, run_experiment
    from loadtests.plan import PlanError, plan
    from serving.config import SimulationConfig
    from serving.pipeline.spec import SpecError
    from serving.simulate.node_autoscaling import node_startup_seconds
    from serving.simulate.profile import ProfileError, load_profile

    def usage(message: str) -> int:
        print(f"ditserve loadtest experiment: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARM_NAMES]
    if not arms or unknown:
        return usage(f"--arms: {', '.join(unknown) or 'none given'}: choose from {', '.join(ARM_NAMES)}")
    if not args.minutes > 0:
        return usage(f"--minutes must be positive, found {args.minutes:g}")
    if not args.slo_seconds > 0:
        return usage(f"--slo-seconds must be positive, found {args.slo_seconds:g}")
    if args.target_seconds is not None and not 0 < args.target_seconds <= args.slo_seconds:
        return usage(f"--target-seconds must be above 0 and at most --slo-seconds, found {args.target_seconds:g}")
    try:
        simulation = SimulationConfig(profile=args.simulate, gpus=args.gpus, nodes=args.nodes,
                                      time_scale=args.time_scale, node_autoscaling=args.node_autoscaling)
        profile = load_profile(args.simulate)
        plan(profile, args.gpus, args.slo_seconds, args.target_seconds, args.cache)
    except SpecError as exc:
        return usage(f"--cache: {exc.message}")
    except ValidationError as exc:
        return usage("; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: "
                               f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors()))
    except (ProfileError, PlanError) as exc:
        return usage(f"--simulate {args.simulate}: {exc}" if isinstance(exc, ProfileError) else f"--gpus: {exc}")
    if args.node_autoscaling:
        try:
            node_startup_seconds(simulation, profile)
        except ValueError as exc:
            return usage(f"--node-autoscaling: {exc}")
    summaries = run_experiment(profile=args.simulate, gpus=args.gpus, nodes=args.nodes, minutes=args.minutes,
                               out=args.out, time_scale=args.time_scale, seed=args.seed, slo_s=args.slo_seconds,
                               target_s=args.target_seconds, cache=args.cache, node_autoscaling=args.node_autoscaling,
                               arms=arms, command=command_line(argv if argv is not None else sys.argv[1:]))
    print(json.dumps({name: {k: s[k] for k in ("completed", "failed", "rejected_429", "slo_attainment",
                                                "queue_wait_p95_s", "gpu_hours", "accelerator_seconds_per_video")}
                      for name, s in summaries.items()}, indent=2))
    return 0


def _ceiling(args, argv: list[str] | None) -> int:
    from pydantic import ValidationError

    from loadtests.ceiling import run_ceiling
    from loadtests.ceiling_cluster import default_nodes, point_gpus
    from loadtests.experiment import command_line
    from serving.config import SimulationConfig
    from serving.pipeline.spec import SpecError
    from serving.simulate.profile import ProfileError, load_profile

    def usage(message: str) -> int:
        print(f"ditserve loadtest ceiling: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    if args.replicas < 1:
        return usage(f"--replicas must be at least 1, found {args.replicas}")
    try:
        scales = [float(x) for x in args.time_scales.split(",") if x.strip()]
    except ValueError:
        return usage(f"--time-scales: {args.time_scales!r} is not a comma-separated list of numbers such as 1,4,16")
    if not scales:
        return usage("--time-scales: none given")
    if not args.minutes > 0:
        return usage(f"--minutes must be positive, found {args.minutes:g}")
    url = args.job_store_url
    if url is not None and not url.startswith(("postgresql://", "postgresql+psycopg://")):
        return usage("--job-store-url: give a Postgres server as postgresql+psycopg://USER@HOST:PORT/DB "
                     "(leave it out for SQLite in each point's folder)")
    gpus = point_gpus(args.replicas)
    nodes = args.nodes or default_nodes(gpus)
    try:
        load_profile(args.simulate)
        for x in scales:
            SimulationConfig(profile=args.simulate, gpus=gpus, nodes=nodes, time_scale=x)
    except ValidationError as exc:
        flags = {"time_scale": "--time-scales", "gpus": "--replicas", "nodes": "--nodes"}
        return usage("; ".join(": ".join(part for part in (flags.get(".".join(map(str, e["loc"])), ""),
                                                            str(e["msg"]).removeprefix("Value error, ")) if part)
                               for e in exc.errors()))
    except ProfileError as exc:
        return usage(f"--simulate {args.simulate}: {exc}")
    summaries = run_ceiling(profile=args.simulate, replicas=args.replicas, time_scales=scales, minutes=args.minutes,
                            nodes=nodes, job_store_url=url, out=args.out,
                            command=command_line(argv if argv is not None else sys.argv[1:]))
    print(json.dumps({f"{s['time_scale']:g}x": {k: s[k] for k in ("equivalent_gpus", "completed", "failed",
                                                                   "jobs_per_min", "overhead_share", "under_budget",
                                                                   "director_cpu_share", "machine_cpu_busy_share")}
                      for s in summaries}, indent=2))
    return 0
