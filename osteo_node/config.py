"""The node's settings: one TOML file, validated at start-up into one typed, frozen object.

Every key is documented in `config.example.toml`. Relative paths resolve against the folder of
the config file. Errors name the key, the value received and what is allowed.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError

log = logging.getLogger(__name__)

AE_TITLE_PATTERN = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14})$")
#: The password in a URL's user information (scheme://user:password@host).
_URL_PASSWORD = re.compile(r"//([^:/@]+):[^@]*@")



def _ae_title(value: str) -> str:
    if not AE_TITLE_PATTERN.match(value) or value != value.strip():
        raise ValueError(
            "an AE title is 1-16 printable ASCII characters, no backslash, no leading or "
            "trailing spaces"
        )
    return value


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Relative paths resolve against the config file's folder (validation context `base`)."""
    value = value.expanduser()
    base = (info.context or {}).get("base")
    return value if value.is_absolute() or base is None else (Path(base) / value).resolve()


def _bundle(value: str, info: ValidationInfo) -> str:
    """A shipped bundle's name ("reference") as is; a path resolved like every config path."""
    if "/" in value or value.startswith("."):
        return str(_resolve(Path(value), info))
    return value


def _existing_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"file not found: {value}")
    return value


Port = Annotated[int, Field(ge=1, le=65535)]
AETitle = Annotated[str, AfterValidator(_ae_title)]
#: A path in the config: relative to the config file's folder.
ConfigPath = Annotated[Path, AfterValidator(_resolve)]
#: A file that must exist at start-up (certificates, keys).
ConfigFile = Annotated[Path, AfterValidator(_resolve), AfterValidator(_existing_file)]


class TlsSettings(BaseModel):
    """DICOM TLS (PS3.15 Annex B.1): our certificate and key, and the CA that signs the peers'."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: PEM certificate and private key presented to peers (required for a receiver).
    cert: ConfigFile | None = None
    key: ConfigFile | None = None
    #: PEM CA bundle: peers must present a certificate it signed (receiver: client certificates
    #: required; sender: the destination's certificate is verified). Empty: receiver does not ask
    #: for client certificates; sender uses the system trust store.
    ca: ConfigFile | None = None

    @model_validator(mode="after")
    def _pair(self) -> "TlsSettings":
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key must be given together (or neither)")
        return self


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    data_dir: ConfigPath = Path("var")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @property
    def store_dir(self) -> Path:
        """The file store's root: received images and the results made from them."""
        return self.data_dir / "store"


class DicomSettings(_Section):
    ae_title: AETitle = "OSTEO_NODE"
    bind_address: str = "127.0.0.1"
    port: Port = 11112
    allowed_calling_aes: tuple[AETitle, ...] = ()
    require_called_ae: bool = True
    max_associations: int = Field(default=10, ge=1, le=1000)
    #: Receiver processes: the node's process accepts every connection on the port and hands it
    #: to the process with the fewest open associations (itself included), so that several
    #: associations use several cores. Each process takes up to max_associations.
    processes: int = Field(default=1, ge=1, le=64)
    max_pdu_size: int = Field(default=0, ge=0)
    max_instance_mb: int = Field(default=200, ge=1)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    #: DICOM TLS for the receiver; absent: plain TCP.
    tls: TlsSettings | None = None
    network_timeout_s: float = Field(default=60.0, gt=0)


class DatabaseSettings(_Section):
    #: Empty: SQLite file `osteo-node.sqlite3` in node.data_dir.
    url: str = ""


class ModelSettings(_Section):
    bundle: Annotated[str, AfterValidator(_bundle)] = "reference"
    #: Shadow models: screened on every eligible image after the live model, stored, never sent
    #: or referred (osteo_node.roles; `osteo-node model promote NAME` makes one live).
    shadow: tuple[Annotated[str, AfterValidator(_bundle)], ...] = ()
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    #: "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16" autocasts on CPU too (osteo_node.model.autocast).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: "bundle": the bundle's own choice (bundle.json "cam"); a method name overrides the method.
    cam_method: Literal["bundle", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam"] = "bundle"
    display_max: int = Field(default=1024, ge=256, le=4096)
    torch_threads: int = Field(default=0, ge=0, le=256)

    @model_validator(mode="after")
    def _distinct_shadows(self) -> "ModelSettings":
        entries = [self.bundle, *self.shadow]
        repeated = sorted({e for e in entries if entries.count(e) > 1})
        if repeated:
            raise ValueError(f"model.shadow must list each bundle once and not model.bundle itself; "
                             f"repeated: {repeated}")
        return self


class WorkerSettings(_Section):
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)
    lease_s: float = Field(default=300.0, ge=1)
    max_attempts: int = Field(default=5, ge=1, le=100)
    retry_base_s: float = Field(default=10.0, gt=0)
    retry_max_s: float = Field(default=600.0, gt=0)
    #: Infer jobs claimed and loaded (read, decode, preprocess) ahead while the model runs, with
    #: SR/SC and recording in a finishing thread; 0 = one job at a time, start to end.
    prefetch: int = Field(default=2, ge=0, le=16)
    #: Infer jobs the model sees in one forward + backward pass (8-32 on a GPU; 1 on a CPU). Above
    #: 1 the worker always overlaps loading, the model and reporting, as with prefetch.
    batch_size: int = Field(default=1, ge=1, le=256)

    @model_validator(mode="after")
    def _retry_order(self) -> "WorkerSettings":
        if self.retry_max_s < self.retry_base_s:
            raise ValueError(
                f"retry_max_s ({self.retry_max_s}) must be >= retry_base_s ({self.retry_base_s})"
            )
        return self


class MetricsSettings(_Section):
    """Prometheus /metrics and /healthz over plain HTTP (keep it on loopback or a management net)."""

    host: str = "127.0.0.1"
    #: Port for `serve` and `work`; 0 disables the endpoint.
    port: int = Field(default=9464, ge=0, le=65535)
    #: Port for `receive` when it runs as its own process; 0 disables it.
    receiver_port: int = Field(default=9465, ge=0, le=65535)


class StorageSettings(_Section):
    retention_days: int = Field(default=30, ge=1)
    min_free_disk_mb: int = Field(default=1024, ge=0)


class DicomwebAuth(_Section):
    """HTTP authentication to a DICOMweb destination: a bearer token, or basic user + password.

    Secrets are `SecretStr`: they never appear in logs, `redacted()` or config errors.
    """

    token: SecretStr | None = None
    user: str | None = None
    password: SecretStr | None = None

    @model_validator(mode="after")
    def _one_scheme(self) -> "DicomwebAuth":
        if self.token is not None and (self.user is not None or self.password is not None):
            raise ValueError("give either auth.token (bearer) or auth.user and auth.password "
                             "(basic), not both")
        if (self.user is None) != (self.password is None):
            raise ValueError("auth.user and auth.password must be given together (basic auth)")
        if self.token is None and self.user is None:
            raise ValueError("auth needs token (bearer) or user and password (basic)")
        return self


class Destination(_Section):
    """Where results go: a DICOM C-STORE peer (`kind = "dimse"`, the default: ae_title, host,
    port, tls) or a DICOMweb STOW-RS service (`kind = "dicomweb"`: url, auth, verify_tls, ca)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["dimse", "dicomweb"] = "dimse"
    #: What is sent: "sr", "sc", and "kos" (the Key Object Selection, which references both).
    send: tuple[Literal["sr", "sc", "kos"], ...] = ("sr", "sc")
    # kind = "dimse"
    ae_title: AETitle | None = None
    host: str | None = None
    port: Port | None = None
    #: DICOM TLS to this destination; absent: plain TCP.
    tls: TlsSettings | None = None
    # kind = "dicomweb"
    #: Base URL of the DICOMweb service (STOW-RS posts to URL/studies).
    url: str | None = None
    auth: DicomwebAuth | None = None
    #: Verify the server's HTTPS certificate (against `ca`, or Python's standard CA bundle, certifi).
    verify_tls: bool = True
    #: PEM CA bundle for the server's certificate; absent: Python's standard bundle (certifi).
    ca: ConfigFile | None = None
    #: Seconds to wait for the DICOMweb server to connect and to answer.
    timeout_s: float = Field(default=60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _kind_keys(self) -> "Destination":
        if "kos" in self.send and not {"sr", "sc"} <= set(self.send):
            raise ValueError(f"send = {list(self.send)}: 'kos' references the SR and SC, so send "
                             "them too (send = [\"sr\", \"sc\", \"kos\"])")
        dimse = {"ae_title": self.ae_title, "host": self.host, "port": self.port}
        web = {"url": self.url, "auth": self.auth, "ca": self.ca}
        if self.kind == "dimse":
            missing = [k for k, v in dimse.items() if v is None]
            if missing:
                raise ValueError(f"kind 'dimse' needs {', '.join(missing)} (or set kind = "
                                 "'dicomweb' with url)")
            stray = [k for k, v in web.items() if v is not None]
            if stray:
                raise ValueError(f"{', '.join(stray)} apply to kind 'dicomweb' only")
            return self
        if self.url is None:
            raise ValueError("kind 'dicomweb' needs url, the DICOMweb base URL (e.g. "
                             "https://pacs.example.org/dicom-web)")
        stray = [k for k, v in {**dimse, "tls": self.tls}.items() if v is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} apply to kind 'dimse' only (kind 'dicomweb' uses "
                             "url, auth, verify_tls, ca)")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be an http:// or https:// URL, got {self.url!r}")
        if parts.username or parts.password:
            raise ValueError("url must not carry credentials; put them in [destinations.auth]")
        if parts.query or parts.fragment:
            raise ValueError(f"url must be a base URL without query or fragment, got {self.url!r}")
        if self.auth is not None and parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError(f"auth over plain http to {parts.hostname!r} would expose the "
                             "credentials: use an https:// url")
        return self

    @property
    def address(self) -> str:
        """Where it is, for logs and the audit trail (no credentials)."""
        if self.kind == "dicomweb":
            return f"DICOMweb {self.url}"
        return f"{self.ae_title}@{self.host}:{self.port}"


class EligibilitySettings(_Section):
    """Which received images are screened: the rules `eligibility.decide` applies (there named
    `EligibilityRules`; the defaults live here only)."""

    modalities: tuple[Literal["CR", "DX"], ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST",)
    views: tuple[Literal["PA", "AP"], ...] = ("PA", "AP")
    sexes: tuple[Literal["F", "M", "O"], ...] = ("F",)
    min_age: int = Field(default=50, ge=0, le=130)
    allow_missing_body_part: bool = True
    allow_missing_view: bool = True
    allow_unknown_age: bool = False


class ReferralSettings(_Section):
    """When a screened radiograph puts the patient on the DXA referral worklist: the policy
    `refer.refer` applies (there named `ReferralPolicy`; the defaults live here only)."""

    enabled: bool = True
    #: Explicit overrides of the operating point (osteo_node.operating_point): when set, they win
    #: over the site operating point and the bundle's validated thresholds, for every model.
    #: Leave them out (the default) so that each model is run at its own operating point.
    osteoporosis_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    low_bmd_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    min_age: int = Field(default=50, ge=0, le=130)
    max_age: int | None = Field(default=None, ge=0, le=130)
    allow_unknown_age: bool = False
    repeat_window_days: int = Field(default=730, ge=0, le=36500)

    @model_validator(mode="after")
    def _age_order(self) -> "ReferralSettings":
        if self.max_age is not None and self.max_age < self.min_age:
            raise ValueError(
                f"referral.max_age ({self.max_age}) must be >= referral.min_age ({self.min_age})"
            )
        return self


class Hl7Settings(_Section):
    """The HL7 v2 listener for DXA results (ORU^R01 over MLLP; osteo_node.hl7_listener)."""

    enabled: bool = False
    bind_address: str = "127.0.0.1"
    port: Port = 2575
    #: MSH-4 values (HD namespace ID) accepted; empty: any sending facility.
    allowed_sending_facilities: tuple[Annotated[str, Field(min_length=1, max_length=227)], ...] = ()
    #: A frame larger than this is refused (AR) and the connection closed.
    max_message_kb: int = Field(default=1024, ge=1, le=65536)


class ValidationSettings(_Section):
    """Site validation: DXA results paired with screened images (osteo_node.pairing, validate)."""

    #: A DXA result is paired with the patient's screened image nearest in time, at most this
    #: many days before or after it.
    match_window_days: int = Field(default=365, ge=0, le=3650)
    #: Fewer pairs than this: status "insufficient-data" (and no operating point from a target).
    min_pairs: int = Field(default=100, ge=1)
    #: Status "failing" when the upper bound of the low-BMD AUC's 95% CI is below this.
    min_low_bmd_auc: float = Field(default=0.75, gt=0.0, lt=1.0)
    #: Patient-level bootstrap resamples behind every confidence interval.
    bootstrap_resamples: int = Field(default=1000, ge=100, le=100000)


#: Secret keys that appear in documentation and must never be used.
PLACEHOLDER_SECRETS = frozenset({"change-me", "changeme", "secret", "please-change-me"})
MIN_SECRET_LENGTH = 32


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebSettings(_Section):
    """The referral worklist web application (`osteo-node web`)."""

    host: str = "127.0.0.1"
    port: Port = 8080
    #: Signs session cookies. Empty: a random key per process (loopback only).
    secret_key: str = ""
    session_minutes: int = Field(default=30, ge=1, le=24 * 60)
    tls_cert: ConfigFile | None = None
    tls_key: ConfigFile | None = None
    page_size: int = Field(default=50, ge=5, le=500)

    @model_validator(mode="after")
    def _secure(self) -> "WebSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("web.tls_cert and web.tls_key must be given together (or neither)")
        if self.secret_key:
            if self.secret_key.strip().lower() in PLACEHOLDER_SECRETS:
                raise ValueError("web.secret_key is a documentation placeholder: generate one with "
                                 "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`")
            if len(self.secret_key) < MIN_SECRET_LENGTH:
                raise ValueError(f"web.secret_key must be at least {MIN_SECRET_LENGTH} characters "
                                 f"(got {len(self.secret_key)})")
        if not is_loopback(self.host):
            if not self.secret_key:
                raise ValueError(f"web.secret_key is required when web.host ({self.host!r}) is "
                                 "not a loopback address")
            if self.tls_cert is None:
                raise ValueError(f"web.tls_cert and web.tls_key are required when web.host "
                                 f"({self.host!r}) is not a loopback address (no plain HTTP on "
                                 "the network)")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class BenchSettings(_Section):
    """`osteo-node bench` only: where its reference tools are."""

    #: Folder with DCMTK's storescu, storescp and echoscu. None: found on PATH (pynetdicom's
    #: Python scripts of the same names are skipped).
    dcmtk_dir: ConfigPath | None = None


class Settings(_Section):
    """The whole configuration. Build it with `load_settings(path)`."""

    node: NodeSettings = NodeSettings()
    dicom: DicomSettings = DicomSettings()
    database: DatabaseSettings = DatabaseSettings()
    model: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()
    storage: StorageSettings = StorageSettings()
    metrics: MetricsSettings = MetricsSettings()
    eligibility: EligibilitySettings = EligibilitySettings()
    referral: ReferralSettings = ReferralSettings()
    web: WebSettings = WebSettings()
    bench: BenchSettings = BenchSettings()
    hl7: Hl7Settings = Hl7Settings()
    validation: ValidationSettings = ValidationSettings()
    destinations: tuple[Destination, ...] = ()

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique; repeated: {duplicates}")
        return value

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.node.data_dir / 'osteo-node.sqlite3'}"

    def redacted(self) -> dict[str, Any]:
        """The effective settings for the start-up log, secrets removed."""
        data = self.model_dump(mode="json")
        data["database"]["url"] = _URL_PASSWORD.sub(r"//\1:***@", self.database_url)
        data["web"]["secret_key"] = "***" if self.web.secret_key else ""
        return data


#: Keys whose values are secrets: never repeated in an error message.
SECRET_KEYS = frozenset({"token", "password", "secret_key"})


def _hide_secrets(value: Any) -> Any:
    """`value` with the values of SECRET_KEYS and URL passwords replaced by "***", at any depth."""
    if isinstance(value, dict):
        return {k: "***" if k in SECRET_KEYS else _hide_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hide_secrets(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"//\1:***@", value)
    return value


def _format_error(error: Any) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    received = error.get("input")
    if error["loc"] and error["loc"][-1] in SECRET_KEYS:
        received = "***"
    return f"{key}: {error['msg']} (got {_hide_secrets(received)!r})"


def parse_settings(raw: dict[str, Any], base: Path) -> Settings:
    """Validate a parsed TOML document; relative paths resolve against `base`."""
    try:
        return Settings.model_validate(raw, context={"base": base})
    except ValidationError as exc:
        lines = "\n  ".join(_format_error(e) for e in exc.errors())
        raise ConfigError(f"invalid configuration:\n  {lines}") from exc


def load_settings(path: Path | str) -> Settings:
    """Read and validate the TOML file at `path`."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_settings(raw, path.resolve().parent)
