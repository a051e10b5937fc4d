"""One settings tree: every `VPR_*` environment variable is declared here.

Sections, each a pydantic-settings model read from its own prefix:

- `HomeSettings`    `VPR_HOME`: where all state lives (models, indexes, jobs, caches, weights);
                    `VPR_OFFLINE`: whether anything may be downloaded
- `IndexSettings`   `VPR_INDEX_*`: vector backend (FAISS or Milvus) and build knobs
- `ServerSettings`  `VPR_*`: what `vpr serve` serves, limits, batching, streams, admin
- `ClientSettings`  `VPR_URL`: the server the `vpr query` / `vpr stream` clients talk to
- `DemoSettings`    `VPR_DEMO_*`: the out-of-the-box demo of `vpr serve --demo`
- `TrackSettings`   `VPR_TRACK_*`: the causal tracker of streams and sessions (also `ServerSettings.track`)

`Settings.load()` reads them all at once; a package receives the section it
needs. CLI flags override fields (`model_copy(update=...)` or constructor
keywords); the CLI takes its defaults from these models instead of restating
them. This module imports nothing of ours, so every package may use it.
The README's configuration table lists every variable (a test checks it).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)


class HomeSettings(BaseSettings):
    """Where state lives. `VPR_HOME` overrides; CLI `--home` overrides both."""

    model_config = SettingsConfigDict(env_prefix="VPR_", extra="ignore")

    home: Path = Path("var")
    # Forbid every download (catalogue weights): a missing file is then an error naming
    # the entry and `vpr weights import`. Unset: forbidden when CI=true, allowed otherwise.
    offline: bool | None = None

    @property
    def forbid_downloads(self) -> bool:
        """VPR_OFFLINE when set, else whether this runs in CI (CI=true, as CI services set)."""
        if self.offline is not None:
            return self.offline
        return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

    @property
    def weights_dir(self) -> Path:
        return self.home / "weights"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def indexes_dir(self) -> Path:
        return self.home / "indexes"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def leases_dir(self) -> Path:
        return self.home / "leases"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


class IndexSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VPR_INDEX_", extra="forbid")

    backend: Literal["faiss", "milvus"] = "faiss"
    # Milvus: "http://host:19530" (cluster / standalone), "https://..." (Zilliz
    # Cloud), or a local file path ending in .db (Milvus Lite). Unset with the
    # milvus backend: Milvus Lite in <indexes_dir>/milvus.db.
    milvus_uri: str | None = None
    milvus_token: SecretStr | None = None  # "user:password" or an API key
    milvus_db: str | None = None  # database name on a cluster
    # Images described per resumable chunk file while building.
    chunk_size: int = Field(256, ge=1, le=1_000_000)
    # Vectors sampled to train IVF / PQ / PCA (FAISS subsamples further per k-means).
    max_train: int = Field(500_000, ge=1)
    # Memory-map IVF inverted lists on load instead of reading them (big indexes).
    mmap: bool = False

    @field_validator("milvus_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        if not (v.startswith(("http://", "https://", "tcp://", "unix:")) or v.endswith(".db")):
            raise ValueError(
                f"milvus_uri {v!r}: expected http(s)://host:port for a server "
                "or a local file path ending in .db for Milvus Lite"
            )
        return v


MiB = 1 << 20


class TrackSettings(BaseSettings):
    """The causal tracker of streams and HTTP sessions (track/tracker.py). Env: `VPR_TRACK_*`.

    Fixed from the database and reasoning, never tuned on test queries (see
    the tracker's docstrings for why each default is what it is)."""

    model_config = SettingsConfigDict(env_prefix="VPR_TRACK_", extra="forbid")

    # Answers carry `track` unless a client asks for frame-only answers.
    enabled: bool = True
    # Places the index returns per frame for the tracker (its candidates).
    candidates: int = Field(20, ge=2, le=1000)
    # (place, velocity) states the belief keeps at most.
    support: int = Field(64, ge=2, le=10_000)
    # The fastest the walker moves, in database spacings per frame: the belief's
    # velocities run from standing still to this, in steps of half a spacing.
    reach: float = Field(3.0, ge=0.5, le=20)
    # Width of the motion kernel around where a state lands, in database spacings
    # (it widens with the square root of the frames not seen).
    width: float = Field(0.5, gt=0, le=100)
    # Chance per frame that the walker changes velocity (stops, speeds up, turns back).
    speed_change: float = Field(0.01, gt=0, lt=1)
    # Chance per frame of a jump anywhere (a kidnapped walker re-localizes).
    teleport: float = Field(0.05, gt=0, lt=1)
    # Share of a place's hubness (how generic it looks, index/hubness.py) taken off
    # its score before the tracker weighs it; 0 uses the raw scores.
    hub_weight: float = Field(0.5, ge=0, le=10)
    # Observation temperature, in units of the stream's running median spread of
    # candidate scores: higher trusts each frame less and the motion more.
    temperature: float = Field(1.5, gt=0, le=100)
    # Read standing vs moving from how alike consecutive frames are (their
    # descriptors' cosine against the database's between places one spacing
    # apart; the index records it): frames that change do not let the belief
    # stand still on a place. Off: only the candidates' scores are evidence.
    frame_motion: bool = True
    # Confidence at or above which the tracker says it is localized.
    localized: float = Field(0.5, gt=0, le=1)
    # HTTP sessions (`X-VPR-Session`): forgotten after this long idle, at most this many.
    session_idle_s: float = Field(300.0, gt=0, le=86_400)
    max_sessions: int = Field(1024, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _consistent(self) -> TrackSettings:
        if self.support < self.candidates:
            raise ValueError(f"track support {self.support} is smaller than its candidates {self.candidates}")
        return self


class ServerSettings(HomeSettings):
    """Everything `vpr serve` and `create_app` need. Env: `VPR_<FIELD>` (e.g.
    `VPR_MODEL=student@3`, `VPR_ADMIN_TOKEN_FILE=/run/secrets/vpr`)."""

    model_config = SettingsConfigDict(env_prefix="VPR_", extra="ignore")

    # ---- listening ------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    access_log: bool = True  # one line per request (uvicorn's access log)
    # ---- slow clients: every connection is bounded in time, and their number ----
    # A request's headers must have arrived this long after the connection opened
    # (or its previous response ended); else the connection is closed.
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    # A request's body must have arrived this long after its headers; else 408 and close.
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    # An idle keep-alive connection is closed after this long (uvicorn's timeout_keep_alive).
    keep_alive_s: int = Field(5, ge=1, le=3600)
    # Open HTTP and websocket connections; a request beyond them gets 503 at once.
    max_connections: int = Field(512, ge=2)

    # ---- what is served -------------------------------------------------
    # Query model: "name" (its active version) or "name@version". None: the
    # model last activated through the admin API, else the active version of
    # the newest student compatible with the index, else its teacher.
    model: str | None = None
    # Index: "name" (its active version) or "name@version". None: the index
    # last served, else the only index, else the one the model can query.
    index: str | None = None
    # "cuda", "cuda:1", "cpu"; None picks CUDA when present.
    device: str | None = None
    # How the query model's forward pass runs (`vpr.model.engines.ENGINES`):
    # "auto" is the device's default chosen by the accuracy guard (CPU:
    # eager-fp32; CUDA: eager-bf16). An engine this machine cannot run falls
    # back to "auto", with the reason on /readyz.
    engine: str = Field("auto", pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")
    # One forward pass at start so the first real query is not the slow one.
    warmup: bool = True
    # Load model and index in a background thread (the server answers
    # /healthz and /readyz=503 meanwhile) instead of blocking start-up.
    load_in_background: bool = True

    # ---- queries ----------------------------------------------------------
    top_k_default: int = Field(5, ge=1)
    top_k_max: int = Field(100, ge=1, le=10_000)
    max_body_bytes: int = Field(8 * MiB, ge=1024)  # one image, raw or multipart
    max_batch_body_bytes: int = Field(32 * MiB, ge=1024)  # /v1/query/batch
    max_batch_files: int = Field(16, ge=1, le=1024)
    max_admin_body_bytes: int = Field(64 * 1024, ge=1024)
    max_pixels: int = Field(25_000_000, ge=64 * 64)  # decompression-bomb guard
    query_timeout_s: float = Field(60.0, gt=0)  # waiting for the model, else 504
    decode_threads: int = Field(4, ge=1, le=64)

    # ---- micro-batching (the model runtime) -------------------------------
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_wait_ms: float = Field(2.0, ge=0, le=1000)
    queue_size: int = Field(64, ge=1)  # pending items; full -> 503 + Retry-After
    retry_after_s: int = Field(1, ge=1)

    # ---- websocket streams ------------------------------------------------
    stream_max_message_bytes: int = Field(4 * MiB, ge=1024)
    stream_hello_timeout_s: float = Field(10.0, gt=0)
    # Undecodable frames tolerated per connection before it is closed.
    stream_max_bad_frames: int = Field(3, ge=0)
    # An H.264 stream that yields no frame within this many bytes is refused.
    stream_probe_bytes: int = Field(8 * MiB, ge=1024)
    stream_max_fps: float = Field(240.0, gt=0)
    stream_max_connections: int = Field(64, ge=1)

    # ---- admin ------------------------------------------------------------
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None
    # Folders whose images the server may read: rebuild jobs index only files
    # under them, and the place-image route serves only files under them.
    # JSON list or os.pathsep-separated (like PATH); unset: `default_data_roots`.
    data_roots: Annotated[list[Path] | None, NoDecode] = None
    jobs_keep: int = Field(200, ge=1)  # job files kept in $VPR_HOME/jobs
    # GET /v1/places/{id}/image (the web page's thumbnails): "public", "token"
    # (the admin token, as for /v1/admin), or "off" (404).
    place_images: Literal["public", "token", "off"] = "public"
    # ---- replicas: several servers over one shared home (README "Scaling out") ----
    # This replica's name in leases, job records and the X-VPR-Replica header; None: host-pid.
    replica_name: str | None = None
    # How often the shared home is checked for a new active model/index (0: never;
    # a change is then served after POST /v1/admin/reload only).
    follow_interval_s: float = Field(2.0, ge=0, le=3600)
    # A rebuild's or activation's lease lasts this long after its holder's last renewal.
    lease_ttl_s: float = Field(15.0, ge=1, le=3600)
    # ---- tracking (its own section, `VPR_TRACK_*`) --------------------------
    track: TrackSettings = Field(default_factory=TrackSettings)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is None or v in ("", "auto"):
            return None
        if v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"bad device {v!r}: use cpu, cuda, cuda:N or auto")

    @field_validator("data_roots", mode="before")
    @classmethod
    def _roots(cls, v: object) -> object:
        """A JSON list, or folders separated by os.pathsep as in PATH; empty: unset."""
        if not isinstance(v, str):
            return v
        text = v.strip()
        if not text:
            return None
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError as e:
                raise ValueError(f"data_roots {text!r}: not a JSON list ({e})") from None
        return [part for part in text.split(os.pathsep) if part.strip()]

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if v.lower() not in levels:
            raise ValueError(f"bad log level {v!r}; choose one of {', '.join(levels)}")
        return v.lower()

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        if self.top_k_default > self.top_k_max:
            raise ValueError(f"top_k_default {self.top_k_default} exceeds top_k_max {self.top_k_max}")
        if self.max_batch_files > self.queue_size:
            raise ValueError(
                f"max_batch_files {self.max_batch_files} exceeds queue_size {self.queue_size}: "
                "such a batch could never be queued"
            )
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ValueError("set either VPR_ADMIN_TOKEN or VPR_ADMIN_TOKEN_FILE, not both")
        if self.place_images == "token" and self.admin_token is None and self.admin_token_file is None:
            raise ValueError("place_images 'token' needs an admin token (VPR_ADMIN_TOKEN or VPR_ADMIN_TOKEN_FILE)")
        return self

    def default_data_roots(self) -> list[Path]:
        """`$VPR_HOME/data` (put database folders there) and `$VPR_HOME/demo` (the demo's route)."""
        return [self.home / "data", self.home / "demo"]

    def resolved_data_roots(self) -> list[Path]:
        """The data roots as absolute paths with links resolved (what paths are checked against)."""
        roots = self.data_roots if self.data_roots is not None else self.default_data_roots()
        return [Path(r).expanduser().resolve() for r in roots]

    def resolved_admin_token(self) -> str | None:
        """The admin token, or None when admin routes are off.

        A configured but unusable token file is an error (failing closed and
        loudly beats silently serving without the admin routes someone set up).
        """
        if self.admin_token is not None:
            token = self.admin_token.get_secret_value().strip()
            if not token:
                raise ValueError("VPR_ADMIN_TOKEN is set but empty")
            return _checked(token, "VPR_ADMIN_TOKEN")
        if self.admin_token_file is None:
            return None
        path = Path(self.admin_token_file)
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise ValueError(f"{path}: cannot read the admin token file ({e.strerror or e})") from e
        if not token:
            raise ValueError(f"{path}: the admin token file is empty")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s: admin token file is readable by group/others; chmod 600 it", path)
        return _checked(token, str(path))


def _checked(token: str, source: str) -> str:
    if len(token) < 16:
        log.warning("%s: admin token has only %d characters; use 32+ random ones", source, len(token))
    return token


class ClientSettings(BaseSettings):
    """The `vpr query` / `vpr stream` clients. Env: `VPR_URL`."""

    model_config = SettingsConfigDict(env_prefix="VPR_", extra="ignore")

    url: str = "http://127.0.0.1:8000"


class DemoSettings(BaseSettings):
    """`vpr serve --demo`. Env: `VPR_DEMO_WEIGHTS`."""

    model_config = SettingsConfigDict(env_prefix="VPR_DEMO_", extra="ignore")

    # VGG16 conv weights (.safetensors, caffe preprocessing) for the demo teacher;
    # None: look in $VPR_HOME/weights, ../shared/weights, then the catalogue's torchvision
    # ImageNet VGG16 (converted copy, torchvision's cache, or fetched unless VPR_OFFLINE).
    weights: Path | None = None


class Settings(BaseModel):
    """The whole tree, read from the environment at once."""

    home: HomeSettings
    index: IndexSettings
    server: ServerSettings
    client: ClientSettings
    demo: DemoSettings
    track: TrackSettings

    @classmethod
    def load(cls) -> Settings:
        return cls(
            home=HomeSettings(),
            index=IndexSettings(),
            server=ServerSettings(),
            client=ClientSettings(),
            demo=DemoSettings(),
            track=TrackSettings(),
        )


SECTIONS: tuple[type[BaseSettings], ...] = (
    HomeSettings,
    IndexSettings,
    ServerSettings,
    ClientSettings,
    DemoSettings,
    TrackSettings,
)


def env_variables() -> list[str]:
    """Every `VPR_*` variable the tree reads, sorted (the README documents each)."""
    names: set[str] = set()
    for section in SECTIONS:
        prefix = section.model_config.get("env_prefix", "")
        names.update(
            f"{prefix}{name}".upper()
            for name, info in section.model_fields.items()
            if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseSettings))
        )  # a section nested in another (ServerSettings.track) is read from its own prefix
    return sorted(names)
