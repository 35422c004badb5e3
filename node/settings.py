"""The one typed settings object of fracnode.

Built once in ``main()`` from, in increasing precedence: embedded defaults, ``fracnode.toml``
(path from ``--config`` or ``FRACNODE_CONFIG``; ``./fracnode.toml`` when it exists) and
``FRACNODE_*`` environment variables (nested keys joined by ``__``, e.g.
``FRACNODE_DICOM__PORT=11113``). Packages receive their own small config objects built from it;
nothing else reads the environment.

An invalid value raises :class:`SettingsError` naming the key; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

AE_TITLE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.")


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16 or not set(stripped) <= AE_TITLE_CHARS:
        raise ValueError("an AE title is 1-16 characters of letters, digits, space, _ - .")
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DicomSettings(_Section):
    """The C-STORE SCP (PS3.7, PS3.8), its network security defaults and resource bounds.

    ``acse_timeout_s`` bounds the TLS handshake plus the whole A-ASSOCIATE-RQ (the ARTIM timer);
    ``network_timeout_s`` bounds an association's silence and the arrival of any one PDU.
    DICOM TLS (PS3.15 B.1, TLS 1.2+): ``tls_port`` opens a second listener for it (2762 is the
    registered port), ``tls_only`` makes the main port speak TLS instead; both need
    ``tls_cert_file`` and ``tls_key_file``. ``tls_ca_file`` set: clients must present a
    certificate signed by it.
    """

    ae_title: str = "FRACNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    max_pdu_bytes: int = Field(1_048_576, ge=4096, le=16_777_216)
    max_associations: int = Field(16, ge=1, le=1000)
    # Connections without an association yet (handshake, request on its way); more are closed.
    max_pending_connections: int = Field(32, ge=1, le=1000)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    # Empty list: any calling AE title.
    allowed_calling_aets: list[str] = Field(default_factory=list)
    # Empty list: any peer address. The default lets only this machine in.
    allowed_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    tls_port: int | None = Field(None, ge=1, le=65535)
    tls_only: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not an IP address or network (e.g. 10.1.2.0/24)") from exc
        return values

    @field_validator("tls_cert_file", "tls_key_file", "tls_ca_file")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"file {path} does not exist")
        return path

    @model_validator(mode="after")
    def _tls(self) -> DicomSettings:
        wanted = self.tls_port is not None or self.tls_only
        files = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        if self.tls_only and self.tls_port is not None:
            raise ValueError("dicom.tls_only puts TLS on dicom.port: leave dicom.tls_port unset")
        if self.tls_port is not None and self.tls_port == self.port:
            raise ValueError("dicom.tls_port must differ from dicom.port (dicom.tls_only: TLS on dicom.port)")
        if wanted and (self.tls_cert_file is None or self.tls_key_file is None):
            raise ValueError("DICOM TLS needs dicom.tls_cert_file and dicom.tls_key_file")
        if not wanted and any(f is not None for f in files):
            raise ValueError("dicom.tls_*_file are set but neither dicom.tls_port nor dicom.tls_only")
        if wanted:
            _check_tls_files(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        return self


def _check_tls_files(cert: Path | None, key: Path | None, ca: Path | None) -> None:
    """Load the files the way the server will, so a bad PEM fails at start-up, not at accept."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"dicom.tls_cert_file {cert} with dicom.tls_key_file {key}: {exc}") from exc
    if ca is not None:
        try:
            context.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"dicom.tls_ca_file {ca}: {exc}") from exc


class SpoolSettings(_Section):
    """Where received instances are written before they are acknowledged."""

    directory: Path = Path("var/spool")
    min_free_bytes: int = Field(2 * 1024**3, ge=0)
    min_free_fraction: float = Field(0.05, ge=0.0, le=1.0)


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/fracnode.db"
    busy_timeout_s: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if not url.startswith(("sqlite:///", "postgresql")):
            raise ValueError("the database URL must start with sqlite:/// or postgresql")
        return url


class AssemblySettings(_Section):
    """When a study is complete enough to process."""

    quiet_seconds: float = Field(5.0, ge=0.0)
    poll_seconds: float = Field(0.5, gt=0.0)


class RoutingSettings(_Section):
    # A TOML file whose keyword tables extend the bundled ones (see inference/data/keywords.toml).
    keywords_file: Path | None = None
    # The image classifier names a region only at or above this confidence ...
    min_image_confidence: float = Field(0.5, ge=0.0, le=1.0)
    # ... and below it the image is "not_analysed" (its reason names the classifier's answer)
    # or "analyse_flagged": analysed as that answer, flagged low-confidence (REVIEW at most).
    below_minimum: Literal["not_analysed", "analyse_flagged"] = "not_analysed"


class PipelineSettings(_Section):
    stretch: bool = True
    clahe: bool = False
    max_pixels: int = Field(100_000_000, ge=1)
    aggregation: Literal["mean", "max"] = "mean"


class ModelSettings(_Section):
    # Packages here are added to the bundled ones (a package of the same name replaces it).
    directory: Path | None = None
    # False: serve only the packages in `directory` (a site's own models).
    include_bundled: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # True: also serve fracture models whose validation AUROC interval contains 0.5 (chance).
    allow_unproven: bool = False


class WorkerSettings(_Section):
    threads: int = Field(1, ge=0, le=64)  # 0: do not process studies (ingest only)
    batch_size: int = Field(8, ge=1, le=256)
    # Processing attempts of one study revision before it is given up (failed, NOT ANALYSED).
    max_attempts: int = Field(3, ge=1)
    # A running job's lease, renewed every third of it while its worker lives; a job of a killed
    # or hung process is taken again once it expires (and the reaper, every 10 s, sees it).
    lease_seconds: float = Field(30.0, ge=3.0, le=3600.0)
    retry_delay_s: float = Field(10.0, ge=0.0)  # before a failed attempt is tried again
    # A worker busy on one study for longer is stuck: /healthz turns red and it is replaced.
    stuck_after_s: float = Field(600.0, ge=10.0)


class Destination(_Section):
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


class ExportSettings(_Section):
    destinations: list[Destination] = Field(default_factory=list)
    calling_ae_title: str = "FRACNODE"
    max_attempts: int = Field(8, ge=1)
    lease_seconds: float = Field(30.0, ge=3.0, le=3600.0)  # of a delivery in progress, renewed
    base_delay_s: float = Field(2.0, ge=0.0)
    max_delay_s: float = Field(300.0, ge=0.0)
    sc_transfer_syntax: Literal["explicit", "jpeg-ls", "jpeg-baseline"] = "explicit"
    summary_sc: bool = False
    gsps: bool = False
    gradcam_sc: bool = False  # an extra SC series with the classifiers' Grad-CAM maps

    _ae = field_validator("calling_ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))


class ApiSettings(_Section):
    """The HTTP API and ``/metrics`` (node.api). Port 0 picks a free port."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Bearer token for every endpoint but /healthz and /readyz; None: no token asked.
    token: SecretStr | None = None
    # Serve HTTPS when both are set (e.g. mounted from a Kubernetes Secret).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @field_validator("token")
    @classmethod
    def _token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError("an API token has at least 16 characters")
        return token

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("api.tls_cert_file and api.tls_key_file are set together")
        return self


class Hl7Settings(_Section):
    """HL7 v2.5 ORU^R01 result messages over MLLP to the RIS (node.hl7)."""

    host: str | None = None  # None: no HL7 messages are sent
    port: int = Field(2575, ge=1, le=65535)
    receiving_application: str = "RIS"
    receiving_facility: str = "HOSPITAL"
    sending_application: str = "FRACNODE"
    sending_facility: str = ""
    timeout_s: float = Field(10.0, gt=0)  # connect and wait for the ACK


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class PrioritySettings(_Section):
    """How far weak evidence may raise a study (inference.priority.PriorityPolicy)."""

    # A positive read by a model of another group, or whose region only the image classifier
    # named, makes the study REVIEW at most (never URGENT) unless these are turned off.
    cap_out_of_group: bool = True
    cap_pixel_guessed: bool = True


class WorklistSettings(_Section):
    """How the worklist (``GET /worklist``) orders studies."""

    # "above_routine": NOT ANALYSED studies (the node could not read them) come right after
    # REVIEW, never hidden below the normal ones; "below_routine": after ROUTINE.
    not_analysed: Literal["above_routine", "below_routine"] = "above_routine"

    def order(self) -> tuple[str, ...]:
        if self.not_analysed == "above_routine":
            return ("urgent", "review", "not_analysed", "routine")
        return ("urgent", "review", "routine", "not_analysed")


class SettingsError(ValueError):
    """A configuration value is invalid; ``key`` names it as it is written in fracnode.toml."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"invalid setting {key}: {message}")
        self.key = key


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FRACNODE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    dicom: DicomSettings = DicomSettings()
    spool: SpoolSettings = SpoolSettings()
    database: DatabaseSettings = DatabaseSettings()
    assembly: AssemblySettings = AssemblySettings()
    routing: RoutingSettings = RoutingSettings()
    pipeline: PipelineSettings = PipelineSettings()
    models: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()
    export: ExportSettings = ExportSettings()
    worklist: WorklistSettings = WorklistSettings()
    priority: PrioritySettings = PrioritySettings()
    api: ApiSettings = ApiSettings()
    hl7: Hl7Settings = Hl7Settings()
    logging: LoggingSettings = LoggingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(config: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Build the settings; ``config`` wins over ``FRACNODE_CONFIG`` wins over ``./fracnode.toml``.

    ``environ`` is read for the config path only; pydantic-settings reads ``os.environ`` itself.
    """
    env = os.environ if environ is None else environ
    path = config
    if path is None and env.get("FRACNODE_CONFIG"):
        path = Path(env["FRACNODE_CONFIG"])
    if path is None and Path("fracnode.toml").is_file():
        path = Path("fracnode.toml")
    if path is not None and not path.is_file():
        raise SettingsError("config", f"file {path} does not exist")
    cls: type[Settings] = Settings
    if path is not None:
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": path}})
    try:
        return cls()
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "settings"
        raise SettingsError(key, first["msg"]) from exc
    except (OSError, ValueError) as exc:  # a TOML syntax error is a ValueError
        raise SettingsError("config", f"{path}: {exc}") from exc


def effective_config(settings: Settings) -> dict[str, Any]:
    """The configuration as plain data with secrets masked, for ``fracnode config show``."""
    data = settings.model_dump(mode="json")
    data["database"]["url"] = _PASSWORD_IN_URL.sub(r"\1***@", data["database"]["url"])
    return data


_PASSWORD_IN_URL = re.compile(r"(://[^:/@]+:)[^@]*@")
