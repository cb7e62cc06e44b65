"""The one configuration model for ditserve, and how it is loaded.

Every setting the service has lives in `ServiceConfig`. It is read from an optional YAML
file (`--config PATH`) and then overridden by environment variables named
`DITSERVE_<SECTION>__<FIELD>` (e.g. `DITSERVE_MODEL__PRESET=tiny`). Every mistake becomes a
`ConfigError` that names the file and line (or the environment variable), the field path,
what was found and what was expected, so the CLI can print it and exit 2.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "DITSERVE_"
ENV_NESTING = "__"


class _Section(BaseModel):
    # Unknown keys are mistakes (a typo silently ignored is the worst kind of config bug).
    model_config = ConfigDict(extra="forbid", validate_default=True)


PresetName = Literal["tiny", "tiny-random", "tiny-i2v", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p"]


class ModelConfig(_Section):
    """Which model to serve and where it runs."""

    preset: PresetName = "tiny"
    path: Path | None = Field(
        default=None,
        description="Local diffusers-format folder (model_index.json, transformer/, vae/, "
        "text_encoder/, tokenizer/, scheduler/). Required by the wan2.1 presets; nothing is "
        "ever downloaded.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="'auto' takes the preset's dtype (tiny: float32, wan2.1: bfloat16)."
    )
    seed: int = Field(default=0, description="Seed the tiny-random preset's weights are built from.")
    attention_backend: Literal["auto", "triton", "xformers", "sdpa"] = Field(
        default="auto", description="DiT attention: our Triton kernel on CUDA when 'auto'; see serving/kernels/dispatch.py.")


class GenerationConfig(_Section):
    """Per-request defaults and limits. A `None` default means: take the preset's."""

    size: str | None = Field(default=None, description="Default WIDTHxHEIGHT, e.g. 832x480.")
    seconds: float | None = Field(default=None, gt=0)
    fps: int | None = Field(default=None, gt=0, le=120)
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0)
    shift: float | None = Field(default=None, gt=0)
    negative_prompt: str | None = None
    max_sequence_length: int | None = Field(default=None, ge=1, description="Text tokens per prompt.")

    max_seconds: float = Field(default=10.0, gt=0)
    max_pixels: int = Field(default=1280 * 720, gt=0, description="Largest width*height a request may ask for.")
    max_steps: int = Field(default=100, ge=1)
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_cost: int | None = Field(
        default=None, ge=1,
        description="Largest cost of one request in latent token-steps (latent frames x latent tokens per frame "
        "x steps, x2 with guidance; see serving/pipeline/cost.py); null takes the preset's budget.")
    cache: str | float = Field(
        default="off", description="Step caching for requests that do not ask: off, a named setting (balanced, "
        "fast: the preset's thresholds) or a threshold (serving/pipeline/step_cache.py).")
    max_cache_threshold: float | None = Field(
        default=None, ge=0, description="The largest step-cache threshold a request may ask for (a fidelity floor); "
        "null: the preset's most aggressive named setting; 0 turns step caching off.")

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value


class AutoscalingConfig(_Section):
    """Replica bounds and targets for one stage. Every stage scales on the device-seconds of
    work waiting for it against its own `target_queue_wait_seconds`, counting a new replica's
    start-up (serving/autoscaling.py has the rule); Serve applies the bounds and delays."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    target_queue_wait_seconds: float = Field(
        default=30.0, gt=0, description="This stage's queue-wait SLO: enough replicas that the work waiting for "
        "it would start within this long.")
    startup_seconds: float | None = Field(
        default=None, ge=0, description="How long a new replica takes to be ready (weights loaded). A scale-up "
        "is worth only the work still waiting then; an idle replica is kept at least this long. null: the "
        "longest start-up this stage's replicas measured (a simulated replica's comes from its profile).")
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)
    look_back_period_s: float = Field(
        default=20.0, gt=0, description="Window the replicas' metrics average over; longer than Serve's metric push "
        "period (10 s, RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S), so each window holds a push.")
    inflow_window_s: float = Field(
        default=60.0, gt=0, description="Window the arrival rate of work is measured over; the stage keeps "
        "replicas for that rate at most 85 % busy. Longer is steadier, shorter follows a burst sooner.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class StageConfig(_Section):
    """Replicas and resources of one model stage (a Ray Serve deployment)."""

    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count, used when autoscaling is unset.")
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(default=0.25, ge=0, description="Ray CPU share per replica (fractional is fine).")
    num_gpus: float = Field(default=0.0, ge=0, description="GPU share per replica; 0.5 packs two on one GPU.")
    max_ongoing_requests: int = Field(default=8, ge=1)
    torch_threads: int = Field(default=1, ge=1, description="torch intra-op threads per replica.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica, e.g. to pin a stage to a worker group.")
    timeout_seconds: float | None = Field(
        default=None, gt=0,
        description="Longest one call may run (the Denoiser: one step, or one wait for a batch slot) before the "
        "job is retried and the replica restarted as hung. None: 10x the measured time, at least 60 s.")
    graceful_shutdown_timeout_s: float | None = Field(
        default=None, gt=0,
        description="How long a replica being removed (a scale-down, an update) may finish the calls it holds "
        "before Serve kills it. None: Serve's 20 s; for the Denoiser, enough for every job it may hold to run "
        "its preset's default steps at the typical step time (x1.5), so a scale-down lets jobs finish rather "
        "than resume them elsewhere from a checkpoint. A replica that fails its health check is stopped at "
        "once regardless (serving/cluster_env.py).")

    @property
    def most_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas


class ParallelConfig(_Section):
    """How many devices one Denoiser replica spans (serving/parallel/): ulysses x cfg ranks,
    each with the stage's num_cpus/num_gpus, packed on one node by a placement group."""

    ulysses: int = Field(default=1, ge=1, le=64, description=(
        "Sequence-parallel degree: each DiT forward's tokens split over this many devices (Ulysses "
        "all-to-all around attention). Must divide the model's attention heads (Wan2.1 1.3B: 12, 14B: 40)."))
    cfg: int = Field(default=1, ge=1, le=2, description=(
        "2 puts a guided request's conditional and unconditional rows (or a batch's halves) on two "
        "groups of devices."))
    layout: Literal["by_load", "split"] = Field(default="by_load", description=(
        "by_load: each forward picks, from the rows it has, between splitting every row across the gang "
        "(latency, for few requests) and giving each device whole rows of its own (throughput, when the "
        "engine batches many); split: always the former (serving/parallel/layout.py)."))
    split_efficiency: float = Field(default=0.8, gt=0, le=1, description=(
        "The gang's speed-up over one device divided by its degree when every row is split (published "
        "4-GPU figure: 3.14 / 4; `ditserve bench parallel` measures it); by_load weighs the layouts with it."))

    @property
    def degree(self) -> int:
        return self.ulysses * self.cfg


class DenoiserStageConfig(StageConfig):
    """The Denoiser's replicas: a stage, whose replica may own a gang of devices."""

    parallel: ParallelConfig = ParallelConfig()


class StagesConfig(_Section):
    text_encoder: StageConfig = StageConfig()
    denoiser: DenoiserStageConfig = DenoiserStageConfig()
    vae_decoder: StageConfig = StageConfig()


class EngineConfig(_Section):
    """The Denoiser's step-level batching engine (one per Denoiser replica)."""

    max_batch: int = Field(default=4, ge=1, description="Requests per DiT forward (CFG rows ride along).")
    checkpoint_every: int = Field(default=5, ge=0, description="Checkpoint latents every N steps; 0 = never.")


class ServerConfig(_Section):
    """The HTTP front door (the Gateway) and the job driver (the Director)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    model_name: str = Field(default="", description="Name reported in video objects; '' uses the preset name.")
    poll_after_ms: int = Field(default=500, ge=50, description="openai-poll-after-ms sent to polling clients.")
    public_url: str | None = Field(
        default=None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="The URL clients reach this API at (e.g. https://video.example.com behind a TLS proxy), for the "
        "links the API hands out (a task's result_url); null: the request's own host and scheme.")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Also enforced on chunked and multipart bodies.")
    max_image_bytes: int = Field(default=10 << 20, ge=1024, description=(
        "Image-to-video presets: the largest first frame (input_reference) accepted, as sent; a create body may "
        "then be this much larger (a third more for a base64 data: URL)."))
    fetch_image_urls: bool = Field(default=False, description=(
        "Image-to-video presets: fetch an input_reference given as an http(s) image_url. Off by default: the "
        "server would connect where a client says. Public addresses only, plus image_url_allowed_networks; no "
        "redirects, no proxies, the size limit counted as it downloads."))
    image_url_allowed_networks: list[str] = Field(default_factory=list, description=(
        "Networks (CIDR) an image_url may point into besides public addresses, e.g. an internal image store."))
    image_url_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=lambda: [80, 443], description=(
        "Ports an image_url may name; a literal address inside image_url_allowed_networks may use any."))
    image_fetch_timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    @field_validator("image_url_allowed_networks")
    @classmethod
    def _image_networks(cls, value: list[str]) -> list[str]:
        return cidr_list(value)

    max_image_pixels: int = Field(default=4096 * 4096, ge=64 * 64, description=(
        "Image-to-video presets: the most pixels a first frame may have, checked from its header before it is "
        "decoded (so a decompression bomb is refused unread)."))
    api_docs: Literal["auto", "public", "off"] = Field(
        default="auto", description="/docs, /redoc and /openapi.json: 'auto' serves them only while auth is off; "
        "'public' serves them to anyone; 'off' never.")
    max_event_streams: int = Field(default=256, ge=1, description="Open progress streams (SSE) per Gateway replica; "
                                   "429 beyond.")
    event_stream_max_seconds: float = Field(default=600.0, gt=0, description="A progress stream ends after this "
                                            "long with a stream.expired event; the client reconnects or polls.")
    event_poll_seconds: float = Field(default=0.5, gt=0, description="How often a Gateway replica reads the jobs "
                                      "its progress streams watch (one query for all of them).")
    gateway_num_cpus: float = Field(default=0.1, ge=0)
    director_num_cpus: float = Field(default=0.1, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources for the Gateway and Director (e.g. the head node's).")
    max_running_jobs: int = Field(
        default=64, ge=1, description="Jobs one Director drives at once (cheap: async tasks); the rest wait in "
        "the job store, where the stages' autoscalers still count them. At least enough to keep every stage "
        "replica busy at max scale (checked).")
    lease_seconds: float = Field(default=30.0, gt=0, description="A job whose driver is silent this long is taken over.")
    director_poll_seconds: float = Field(default=1.0, gt=0)
    progress_write_seconds: float = Field(
        default=0.5, ge=0, description="Least time between two progress writes of one denoising job (stage "
        "changes and checkpoints are written at once); 0 writes every step.")
    max_job_attempts: int = Field(
        default=5, ge=1, description="Tries of one job (each resumes from its checkpoint) before it fails: a "
        "stage that hung or died, or a storage or database outage, costs a try.")


class AdmissionConfig(_Section):
    """When to refuse new jobs instead of queueing them (the rule: serving/admission.py)."""

    max_queue_wait_seconds: float | None = Field(
        default=600.0, gt=0,
        description="The longest an admitted job waits to start. The queue holds what the replicas drain in this "
        "time, in accelerator-seconds per job: a job whose own work does not fit behind the work ahead of it gets "
        "429 + Retry-After (large jobs first, small ones still fit); keep it above the largest job's own time. "
        "null never refuses.")


class PolicyRule(_Section):
    """One operator rule: whole-word terms (any case) and/or a regular expression."""

    id: str = Field(min_length=1, description="Named in every refusal this rule causes.")
    terms: list[str] = Field(default_factory=list)
    regex: str | None = None
    message: str = Field(default="", description="Why the rule exists, shown to the user.")

    @model_validator(mode="after")
    def _has_a_pattern(self) -> "PolicyRule":
        import re

        if not self.terms and not self.regex:
            raise ValueError(f"rule {self.id!r} has neither terms nor a regex")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"rule {self.id!r}: regex does not compile: {exc}") from None
        return self


class ContentPolicyConfig(_Section):
    """A transparent content policy: off by default; a refusal names its rule and the match."""

    enabled: bool = False
    rules: list[PolicyRule] = Field(default_factory=list)


WEBHOOK_SECRET_PATTERN = r"^whsec_[A-Za-z0-9+/=]+$"


class ApiKey(_Section):
    """One client key. Only its SHA-256 is kept: a leaked config does not leak the key
    (`ditserve keys create NAME` makes a key and prints this entry)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="The tenant: owns every video created with this key.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the key.")
    requests_per_minute: int | None = Field(default=None, ge=1, description="Overrides auth.requests_per_minute.")
    max_concurrent_jobs: int | None = Field(default=None, ge=1, description="Overrides auth.max_concurrent_jobs.")
    webhook_secret: str | None = Field(
        default=None, pattern=WEBHOOK_SECRET_PATTERN,
        description="Signs this key's webhook events (whsec_...; `ditserve keys create` makes one), so no other "
        "tenant can forge them. Unset: webhooks.secret signs them.")
    reads_per_minute: int | None = Field(default=None, ge=1, description="Overrides auth.reads_per_minute.")
    max_event_streams: int | None = Field(default=None, ge=1, description="Overrides auth.max_event_streams.")
    max_priority: int | None = Field(default=None, ge=-100, le=100, description="Overrides auth.max_priority.")
    operator: bool = Field(default=False, description="An operator's key: GET /v1/usage shows every key's usage "
                                                      "(other keys see their own). Its videos stay its own.")


class AuthConfig(_Section):
    """API keys (`Authorization: Bearer KEY`, what the openai SDK sends). Off by default for
    a local service; on in the Kubernetes overlays. Each key sees only its own videos."""

    enabled: bool = False
    keys: list[ApiKey] = Field(default_factory=list)
    requests_per_minute: int = Field(default=600, ge=1, description="Writes (creates, cancels, deletes) per key, "
                                     "per Gateway replica; 429 beyond.")
    reads_per_minute: int | None = Field(
        default=None, ge=1, description="Reads (GETs) per key, per Gateway replica; 429 beyond. null: twice what "
        "polling max_concurrent_jobs videos every server.poll_after_ms needs, so SDK polling never trips it.")
    max_concurrent_jobs: int = Field(default=16, ge=1, description="Queued plus running videos per key; 429 beyond.")
    max_event_streams: int = Field(default=16, ge=1, description="Open progress streams (SSE) per key, per Gateway "
                                   "replica; 429 beyond.")
    max_priority: int = Field(default=0, ge=-100, le=100, description="Highest job priority a key may ask for "
                              "(priority is the operator's to give); 403 above it.")

    @model_validator(mode="after")
    def _usable(self) -> "AuthConfig":
        names = [key.name for key in self.keys]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"key names must be unique; repeated: {', '.join(duplicates)}")
        hashes = [key.sha256 for key in self.keys]
        if len(set(hashes)) != len(hashes):
            raise ValueError("two keys have the same sha256: one key would belong to two tenants")
        secrets = [key.webhook_secret for key in self.keys if key.webhook_secret]
        if len(set(secrets)) != len(secrets):
            raise ValueError("two keys have the same webhook_secret: each tenant could forge the other's events")
        if self.enabled and not self.keys:
            raise ValueError("auth is enabled but auth.keys is empty, so no request could get in; "
                             "make a key with `ditserve keys create NAME`")
        return self


class WebhooksConfig(_Section):
    """Per-job callbacks (`webhook_url` on create), signed the Standard Webhooks way, sent only
    to public addresses unless the operator trusts a network (see serving/egress.py)."""

    secret: str | None = Field(
        default=None, pattern=WEBHOOK_SECRET_PATTERN,
        description="Signs the events of jobs made without an API key, or by a key with no webhook_secret of its "
        "own (whsec_ + base64; `ditserve keys webhook-secret` makes one). A job nobody can sign for may not ask "
        "for a webhook.")
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="Networks (CIDR, e.g. 10.0.0.0/8) webhooks may reach although they are not public. Otherwise "
        "loopback, private, link-local, unique-local, CGNAT, multicast and reserved addresses are refused, "
        "however the URL spells them and whatever a host name resolves to.")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names (fnmatch patterns) webhooks may call; empty allows any host with a public "
        "address. Restrict it further when tenants are not trusted.")
    max_attempts: int = Field(default=10, ge=1)
    initial_backoff_seconds: float = Field(default=5.0, gt=0, description="Doubles after each failed attempt.")
    max_backoff_seconds: float = Field(default=3600.0, gt=0)
    timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        return cidr_list(value)


def cidr_list(value: list[str]) -> list[str]:
    """Networks in CIDR form, normalized; ValueError naming one that is not."""
    import ipaddress

    networks = []
    for text in value:
        try:
            networks.append(str(ipaddress.ip_network(text.strip())))
        except ValueError as exc:
            raise ValueError(f"{text!r} is not a network in CIDR form such as 10.0.0.0/8 or fd00::/8 "
                             f"({exc})") from None
    return networks


class StorageConfig(_Section):
    """Where jobs and videos live. Relative local paths are made absolute at load time,
    since Ray workers need not share the launching shell's working directory."""

    job_store_url: str = Field(default="sqlite:///ditserve-data/jobs.db", description="SQLAlchemy URL.")
    artifacts_url: str = Field(default="ditserve-data/artifacts", description="Local folder or fsspec URL.")
    artifacts_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options for artifacts_url, e.g. {endpoint_url: ...} for "
        "an S3-compatible store; leave credentials to the backend's environment variables.")
    retention_hours: float | None = Field(
        default=None, gt=0, description="Delete videos after this long once they end (completed, failed or cancelled); "
        "none by default.")

    @field_validator("job_store_url")
    @classmethod
    def _absolute_sqlite(cls, value: str) -> str:
        prefix = "sqlite:///"
        if value.startswith(prefix) and not value.startswith(prefix + "/") and value != prefix + ":memory:":
            return prefix + str(Path(value[len(prefix):]).expanduser().resolve())
        return value

    @field_validator("artifacts_url")
    @classmethod
    def _absolute_folder(cls, value: str) -> str:
        return value if "://" in value else str(Path(value).expanduser().resolve())


class SimulationConfig(_Section):
    """Simulated accelerators (serving/simulate/): every model stage waits the time its cost
    profile gives instead of computing, on a local Ray cluster of `nodes` nodes that declare
    `gpus` GPUs between them. Everything else is the real service; every output says so."""

    profile: str = Field(description="A packaged cost profile (h100-wan2.1-1.3b, h100-wan2.1-14b, tiny-cpu) or "
                                     "the path of a profile JSON (`ditserve bench profile` writes one).")
    time_scale: float = Field(default=1.0, ge=1.0, description="Divides every profile time and every control-plane "
                              "period and target alike (see serving/simulate/timescale.py); reports convert back.")
    gpus: int = Field(default=8, ge=1, description="Simulated GPUs in the whole cluster.")
    nodes: int = Field(default=1, ge=1, description="Simulated GPU nodes; the GPUs are spread evenly over them.")
    node_autoscaling: bool = Field(default=False, description=(
        "Start with the GPU nodes the stages' minimum replicas need and let Ray's autoscaler add nodes (up to "
        "`nodes`) while replicas wait for GPUs and remove idle ones, as KubeRay does (serving/simulate/cluster.py)."))
    node_startup_seconds: float | None = Field(default=None, ge=0, description=(
        "Seconds a new GPU node takes to join (node_autoscaling). None: the cost profile's."))
    node_idle_timeout_seconds: float = Field(default=60.0, ge=0, description=(
        "How long a GPU node holds no replica before the autoscaler removes it (KubeRay's default)."))

    @model_validator(mode="after")
    def _a_gpu_per_node(self) -> "SimulationConfig":
        if self.gpus < self.nodes:
            raise ValueError(f"gpus ({self.gpus}) is below nodes ({self.nodes}): every node needs a GPU")
        if self.node_autoscaling and self.gpus % self.nodes:
            raise ValueError(f"node_autoscaling adds nodes of one kind: gpus ({self.gpus}) must be a multiple of "
                             f"nodes ({self.nodes})")
        return self

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes


class ServiceConfig(_Section):
    """The whole service. Sections grow with the service; this is the only source of truth."""

    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    server: ServerConfig = ServerConfig()
    stages: StagesConfig = StagesConfig()
    engine: EngineConfig = EngineConfig()
    admission: AdmissionConfig = AdmissionConfig()
    content_policy: ContentPolicyConfig = ContentPolicyConfig()
    auth: AuthConfig = AuthConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    storage: StorageConfig = StorageConfig()
    simulation: SimulationConfig | None = Field(
        default=None, description="Set by `ditserve serve --simulate`: simulated accelerators instead of models.")

    @model_validator(mode="after")
    def _denoiser_can_fill_a_batch(self) -> "ServiceConfig":
        if self.stages.denoiser.max_ongoing_requests < self.engine.max_batch:
            raise ValueError(
                f"stages.denoiser.max_ongoing_requests ({self.stages.denoiser.max_ongoing_requests}) is below "
                f"engine.max_batch ({self.engine.max_batch}): a replica could never fill a batch")
        return self

    @model_validator(mode="after")
    def _gang_fits_the_model(self) -> "ServiceConfig":
        from serving.models.presets import PRESETS

        ulysses, heads = self.stages.denoiser.parallel.ulysses, PRESETS[self.model.preset].attention_heads
        if heads % ulysses:
            raise ValueError(f"stages.denoiser.parallel.ulysses ({ulysses}) must divide the {self.model.preset} "
                             f"model's {heads} attention heads; e.g. one of "
                             f"{[d for d in range(1, heads + 1) if heads % d == 0]}")
        return self

    @model_validator(mode="after")
    def _image_models_can_run(self) -> "ServiceConfig":
        from serving.models.presets import I2V_TEXT_TOKENS, PRESETS

        asked = self.generation.max_sequence_length
        if PRESETS[self.model.preset].takes_image and asked not in (None, I2V_TEXT_TOKENS):
            # Wan's I2V DiT finds where its image tokens end by counting the text's from the end.
            raise ValueError(f"generation.max_sequence_length must be {I2V_TEXT_TOKENS} (or unset) for the "
                             f"image-to-video model {self.model.preset}: the DiT tells its image tokens from the "
                             f"text's by that count; found {asked}")
        if PRESETS[self.model.preset].takes_image and self.simulation is not None:
            # The stand-ins (serving/simulate/) cover the text encoder, the DiT and the VAE decode,
            # not the CLIP encoder or the first frame's VAE encode: every job would fail.
            raise ValueError(f"simulation: the image-to-video model {self.model.preset} cannot be simulated (no "
                             "stand-ins for its image encoder yet); simulate a text-to-video preset")
        return self

    @model_validator(mode="after")
    def _director_can_feed_every_replica(self) -> "ServiceConfig":
        # A job is at one stage at a time: at full scale the Director must drive a full batch per
        # Denoiser and a call per other replica, or replicas the autoscalers add would sit idle.
        stages = self.stages
        busy = {"stages.denoiser": stages.denoiser.most_replicas * self.engine.max_batch,
                "stages.text_encoder": stages.text_encoder.most_replicas,
                "stages.vae_decoder": stages.vae_decoder.most_replicas}
        if self.server.max_running_jobs < sum(busy.values()):
            parts = " + ".join(f"{n} ({name})" for name, n in busy.items())
            raise ValueError(
                f"server.max_running_jobs ({self.server.max_running_jobs}) is below the jobs it takes to keep every "
                f"stage replica busy at max scale, {parts} = {sum(busy.values())} (the Denoiser's counted as "
                f"max_replicas x engine.max_batch): raise it, or the replicas beyond it would sit idle")
        return self


def parse_size(size: str) -> tuple[int, int]:
    """'832x480' -> (832, 480); raises ValueError with a message fit for a person."""
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"expected WIDTHxHEIGHT such as 832x480, found {size!r}")
    width, height = (int(p) for p in parts)
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, found {size!r}")
    return width, height


# --------------------------------------------------------------------------------------
# Loading and error reporting
# --------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A configuration mistake, already phrased for a person (one line per problem)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


Location = tuple[str | int, ...]


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Read the YAML file (if any), apply `DITSERVE_*` environment overrides, validate."""
    data: dict[str, Any] = {}
    lines: dict[Location, int] = {}
    if path is not None:
        data, lines = _read_yaml(Path(path))
    return _validate(data, str(path) if path is not None else "config", lines, environ)


def config_from_dict(data: dict[str, Any], source: str, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """The same, for a config that arrives as data (e.g. the args of a RayService's serveConfigV2)."""
    import copy

    return _validate(copy.deepcopy(data), source, {}, environ)


def _validate(data: dict[str, Any], source: str, lines: dict[Location, int],
              environ: Mapping[str, str] | None) -> ServiceConfig:
    environ = os.environ if environ is None else environ
    env_sources = _apply_env(data, environ)
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(err, source, lines, env_sources) for err in exc.errors()]
        raise ConfigError(problems) from None


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[Location, int]]:
    if not path.exists():
        raise ConfigError([f"{path}: config file not found (check the --config path)"])
    if path.is_dir():
        raise ConfigError([f"{path}: is a directory, expected a YAML file"])
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML ({exc.problem}); check the indentation of this line "
                           "and the block above it"]) from None
    if root is None:
        return {}, {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError([f"{path}:{root.start_mark.line + 1}: expected a mapping of sections (model:, generation:, ...)"])
    lines: dict[Location, int] = {}
    _collect_lines(root, (), lines, path)
    data = yaml.safe_load(text)
    return data, lines


def _collect_lines(node: yaml.Node, loc: Location, lines: dict[Location, int], path: Path) -> None:
    """Map every key path to its 1-based line, and refuse duplicate keys (YAML keeps the last silently)."""
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError([f"{path}:{line}: {_dotted(loc + (key,))}: duplicate key (first set on line {seen[key]})"])
            seen[key] = line
            _collect_lines(value_node, loc + (key,), lines, path)
            lines[loc + (key,)] = line
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_lines(item, loc + (index,), lines, path)


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[Location, str]:
    """Overlay DITSERVE_SECTION__FIELD variables onto the parsed YAML; return where each came from."""
    sources: dict[Location, str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or ENV_NESTING not in name:
            continue
        loc = tuple(part.lower() for part in name[len(ENV_PREFIX):].split(ENV_NESTING))
        # Values are YAML scalars, so `8` is a number and `null` clears a field, as in the file.
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        target = data
        for part in loc[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[loc[-1]] = value
        sources[loc] = name
    return sources


_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "model_type": "a mapping (an indented block of key: value lines)",
    "model_attributes_type": "a mapping (an indented block of key: value lines)",
    "dict_type": "a mapping (an indented block of key: value lines)",
    "path_type": "a file system path",
}


def _describe(err: dict[str, Any], source: str, lines: dict[Location, int], env: dict[Location, str]) -> str:
    loc: Location = tuple(err["loc"])
    kind = err["type"]
    field = _dotted(loc)
    where = _where(loc, source, lines, env)
    found = err.get("input")
    if kind == "extra_forbidden":
        return f"{where}: {field}: unknown key{_suggest(loc)}"
    if kind == "missing":
        return f"{where}: {field}: required, but not set"
    if kind == "literal_error":
        return f"{where}: {field}: expected one of {err['ctx']['expected']}, found {_show(found)}"
    if kind in _EXPECTED:
        return f"{where}: {field}: expected {_EXPECTED[kind]}, found {_show(found)}"
    message = str(err["msg"]).removeprefix("Value error, ")
    if kind == "value_error":  # our own validators already say what they found
        return f"{where}: {message}" if not loc else f"{where}: {field}: {message}"
    return f"{where}: {field}: {message}, found {_show(found)}"


def _show(value: Any) -> str:
    return "nothing (an empty value)" if value is None else repr(value)


def _where(loc: Location, source: str, lines: dict[Location, int], env: dict[Location, str]) -> str:
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in env:
            return f"environment {env[loc[:depth]]}"
    for depth in range(len(loc), -1, -1):
        if loc[:depth] in lines:
            return f"{source}:{lines[loc[:depth]]}"
    return source


def _suggest(loc: Location) -> str:
    """'did you mean' from the sibling fields; and, for a key at the wrong depth, where it belongs."""
    model: type[BaseModel] = ServiceConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    key = str(loc[-1])
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    homes = [f"{section}.{key}" for section, f in ServiceConfig.model_fields.items()
             if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) and key in f.annotation.model_fields]
    if homes and len(loc) == 1:
        return f" (it belongs under {homes[0].split('.')[0]}: — is the block mis-indented? expected {homes[0]})"
    return f" (known keys: {', '.join(model.model_fields)})"


def _dotted(loc: Location) -> str:
    return ".".join(str(part) for part in loc) or "<root>"
