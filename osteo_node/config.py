"""The node's settings: one TOML file, validated at start-up into one typed, frozen object.

Every key is documented in `config.example.toml`. Relative paths resolve against the folder of
the config file. Errors name the key, the value received and what is allowed.
"""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .eligibility import EligibilityRules
from .errors import ConfigError

log = logging.getLogger(__name__)

AE_TITLE_PATTERN = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14})$")



def _ae_title(value: str) -> str:
    if not AE_TITLE_PATTERN.match(value) or value != value.strip():
        raise ValueError(
            "an AE title is 1-16 printable ASCII characters, no backslash, no leading or "
            "trailing spaces"
        )
    return value


Port = Annotated[int, Field(ge=1, le=65535)]
AETitle = Annotated[str, AfterValidator(_ae_title)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    data_dir: Path = Path("var")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"


class DicomSettings(_Section):
    ae_title: AETitle = "OSTEO_NODE"
    bind_address: str = "127.0.0.1"
    port: Port = 11112
    allowed_calling_aes: tuple[AETitle, ...] = ()
    require_called_ae: bool = True
    max_associations: int = Field(default=10, ge=1, le=1000)
    max_pdu_size: int = Field(default=0, ge=0)
    max_instance_mb: int = Field(default=200, ge=1)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)


class DatabaseSettings(_Section):
    #: Empty: SQLite file `osteo-node.sqlite3` in node.data_dir.
    url: str = ""


class ModelSettings(_Section):
    bundle: str = "reference"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    cam_method: Literal["gradcam", "gradcam++"] = "gradcam"
    display_max: int = Field(default=1024, ge=256, le=4096)
    torch_threads: int = Field(default=0, ge=0, le=256)


class WorkerSettings(_Section):
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)
    lease_s: float = Field(default=300.0, ge=1)
    max_attempts: int = Field(default=5, ge=1, le=100)
    retry_base_s: float = Field(default=10.0, gt=0)
    retry_max_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _retry_order(self) -> "WorkerSettings":
        if self.retry_max_s < self.retry_base_s:
            raise ValueError(
                f"retry_max_s ({self.retry_max_s}) must be >= retry_base_s ({self.retry_base_s})"
            )
        return self


class StorageSettings(_Section):
    retention_days: int = Field(default=30, ge=1)
    min_free_disk_mb: int = Field(default=1024, ge=0)


class Destination(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: AETitle
    host: str
    port: Port
    send: tuple[Literal["sr", "sc"], ...] = ("sr", "sc")


class EligibilitySettings(_Section):
    modalities: tuple[Literal["CR", "DX"], ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST",)
    views: tuple[Literal["PA", "AP"], ...] = ("PA", "AP")
    sexes: tuple[Literal["F", "M", "O"], ...] = ("F",)
    min_age: int = Field(default=50, ge=0, le=130)
    allow_missing_body_part: bool = True
    allow_missing_view: bool = True
    allow_unknown_age: bool = False

    def rules(self) -> EligibilityRules:
        return EligibilityRules(**self.model_dump())


class Settings(_Section):
    """The whole configuration. Build it with `load_settings(path)`."""

    node: NodeSettings = NodeSettings()
    dicom: DicomSettings = DicomSettings()
    database: DatabaseSettings = DatabaseSettings()
    model: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()
    storage: StorageSettings = StorageSettings()
    eligibility: EligibilitySettings = EligibilitySettings()
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
        data["database"]["url"] = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", self.database_url)
        return data


def _format_error(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    node = dict(raw.get("node", {}))
    data_dir = Path(node.get("data_dir", "var")).expanduser()
    node["data_dir"] = data_dir if data_dir.is_absolute() else (base / data_dir).resolve()
    model = dict(raw.get("model", {}))
    bundle = model.get("bundle")
    if isinstance(bundle, str) and ("/" in bundle or bundle.startswith(".")):
        path = Path(bundle).expanduser()
        model["bundle"] = str(path if path.is_absolute() else (base / path).resolve())
    return {**raw, "node": node, **({"model": model} if model else {})}


def parse_settings(raw: dict[str, Any], base: Path) -> Settings:
    """Validate a parsed TOML document; relative paths resolve against `base`."""
    try:
        return Settings.model_validate(_resolve_paths(raw, base))
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
