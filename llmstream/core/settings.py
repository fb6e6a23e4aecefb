"""Settings every deployable shares: where Kafka and Redis are, topic names, the output format.

Each deployable (worker, ingress, simulator) has one pydantic-settings class that derives from
:class:`ServiceSettings`; the environment is read there and nowhere else. Kafka and Redis take the
ecosystem's own variables (``KAFKA_BOOTSTRAP_SERVERS``, ``REDIS_URL``); everything else is
``LLMSTREAM_*``.

Secured clusters: Kafka's security is ``LLMSTREAM_KAFKA_*`` (see :class:`ServiceSettings`, turned
into client options by :mod:`connections`); Redis's is in its URL, as redis-py reads it
(``rediss://user:password@host:6380/0?ssl_ca_certs=/etc/ca.pem``). Neither password is ever shown:
they are ``SecretStr``, and the Redis URL is redacted in ``repr`` (:func:`redact_url`).
"""

from __future__ import annotations

import enum
import json
import os
import re
import tomllib
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values
from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmstream.schemas.codec import WireFormat

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
# lz4, snappy and zstd come from cramjam (aiokafka's extras, installed with llmstream).
KafkaCompression = Literal["none", "gzip", "snappy", "lz4", "zstd"]


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs, reprs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class ServiceSettings(BaseSettings):
    """Connection and contract settings shared by the worker and the ingress."""

    # An empty variable is an unset one: deployments pass `${VAR:-}` for what is optional.
    model_config = SettingsConfigDict(
        env_prefix="LLMSTREAM_",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
        env_ignore_empty=True,
    )

    kafka_bootstrap_servers: str = Field(
        "localhost:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
    )
    redis_url: str = Field(
        "redis://localhost:6379/0", validation_alias=AliasChoices("REDIS_URL", "redis_url")
    )
    # REDIS_URL names one node of a Redis Cluster (the client finds the others): every
    # deployable (worker, ingress, replay, recover-redis) then speaks the cluster protocol.
    redis_cluster: bool = False
    redis_key_prefix: str = "llmstream:"
    requests_topic: str = "llm-requests"
    responses_topic: str = "llm-responses"
    metrics_topic: str = "llm-metrics"
    errors_topic: str = "llm-errors"
    # The chunks of streamed answers (LLMSTREAM_CHUNKS_TOPIC), keyed by request ID.
    chunks_topic: str = "llm-response-chunks"
    output_format: WireFormat = WireFormat.JSON
    # How long completed and failed results stay in Redis for the ingress (and for dedup).
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60)

    # Kafka security: SASL (PLAIN or SCRAM) and/or TLS. TLS verifies the brokers against
    # kafka_ssl_cafile, else the system's CAs; a client certificate (mutual TLS) is optional.
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_keyfile_password: SecretStr | None = None
    # Producers always wait for acks from all in-sync replicas. The idempotent producer keeps a
    # retried send from being written twice. Unset (the default) means: on where the broker
    # grants producer IDs (Apache Kafka), off with a one-line notice where it cannot (the embedded
    # Tansu broker); true insists and refuses to start without it; false turns it off.
    kafka_idempotent_producer: bool | None = None
    kafka_compression: KafkaCompression = "none"

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("kafka_compression", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _kafka_security(self) -> ServiceSettings:
        protocol = self.kafka_security_protocol
        sasl = protocol.startswith("SASL_")
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                f"kafka_security_protocol={protocol} needs kafka_sasl_username and "
                "kafka_sasl_password"
            )
        if not sasl and (self.kafka_sasl_username or self.kafka_sasl_password):
            raise ValueError(
                f"SASL credentials are set but kafka_security_protocol={protocol}: "
                "use SASL_SSL (or SASL_PLAINTEXT)"
            )
        ssl_files = [
            name
            for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
            if getattr(self, name) is not None
        ]
        if ssl_files and not protocol.endswith("SSL"):
            raise ValueError(
                f"{', '.join(ssl_files)} set but kafka_security_protocol={protocol}: "
                "use SSL or SASL_SSL"
            )
        if self.kafka_ssl_keyfile is not None and self.kafka_ssl_certfile is None:
            raise ValueError("kafka_ssl_keyfile needs kafka_ssl_certfile")
        return self

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # A Redis URL may carry a password: never let a printed settings object show it.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" else value


def environment_variable(cls: type[BaseSettings], name: str) -> str:
    """The environment variable that sets field ``name`` of ``cls``."""
    field = cls.model_fields.get(name)
    alias = field.validation_alias if field is not None else None
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        for choice in alias.choices:
            if isinstance(choice, str) and choice.isupper():
                return choice
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def describe_invalid_settings(exc: ValidationError) -> str:
    """A settings validation error as lines naming each variable and what is wrong with it.

    Never the value: a secret pasted into the wrong variable, or a key inside a mistyped JSON
    setting, would otherwise be printed (pydantic's own message echoes every input).
    """
    cls = _settings_class(exc.title)
    lines = [f"invalid configuration ({exc.error_count()} error(s)):"]
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        loc = [str(part) for part in error["loc"]]
        if cls is not None and loc:
            loc[0] = environment_variable(cls, loc[0])
        lines.append(f"  {'.'.join(loc) or exc.title}: {error['msg']}")
    return "\n".join(lines)


def _settings_class(name: str) -> type[BaseSettings] | None:
    pending: list[type[BaseSettings]] = [BaseSettings]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def environment_help(*classes: type[BaseSettings]) -> str:
    """The environment variables ``classes`` read, one per line with its default (for --help).

    Secrets are listed by name only; a default computed at start-up says so.
    """
    lines: list[str] = []
    for cls in classes:
        for name, field in cls.model_fields.items():
            variable = environment_variable(cls, name)
            if field.default_factory is not None:
                built = field.default_factory()  # type: ignore[call-arg]
                if isinstance(built, dict | list):
                    default = "(built-in table)" if built else "(none)"
                else:
                    default = "(computed at start)"
            elif field.default is None or field.annotation is SecretStr:
                default = "(unset)"
            else:
                value = field.default
                default = str(value.value if isinstance(value, enum.Enum) else value)
            entry = f"  {variable}={default}"
            if entry not in lines:
                lines.append(entry)
    return "\n".join(lines)


def load_object_file(path: Path, variable: str, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (TOML when it ends in ``.toml``) that ``variable`` names.

    Errors are ValueErrors that say which variable and file, so settings validation reports them.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {variable} {path}: {exc}") from exc
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse {variable} {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{variable} {path} must hold an object of {what}")
    return raw


# --- the running dev stack's addresses ----------------------------------------------------------

# Written by `llmstream dev` (`make run`) once its stack is up, removed when it stops.
STACK_FILE = Path(".llmstream/stack.env")
_STACK_PID = re.compile(r"^# llmstream dev pid (\d+)\b", re.MULTILINE)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def stack_file_pid(path: Path = STACK_FILE) -> int | None:
    """The ``llmstream dev`` process that wrote ``path`` if it still runs, else None."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    found = _STACK_PID.search(text)
    if found is None or not _running(int(found.group(1))):
        return None
    return int(found.group(1))


def apply_stack_file(
    path: Path = STACK_FILE, environ: MutableMapping[str, str] = os.environ
) -> str | None:
    """Fill ``environ`` from the stack file of a running ``llmstream dev``; a notice, or None.

    Only the command-line entry points call this (settings classes never read the file, so
    library code and tests see only what they are given). A variable already set wins; and when
    ``KAFKA_BOOTSTRAP_SERVERS`` or ``REDIS_URL`` is set, the file is not used at all: those name
    other services than the dev stack's. A file whose ``llmstream dev`` is gone (killed before it
    could remove it) is ignored, so it never points a command at services that no longer exist.
    """
    if not path.is_file():
        return None
    if stack_file_pid(path) is None:
        return f"ignoring {path}: the llmstream dev that wrote it is not running"
    if environ.get("KAFKA_BOOTSTRAP_SERVERS") or environ.get("REDIS_URL"):
        return None
    applied = []
    for key, value in dotenv_values(path).items():
        if value is not None and not environ.get(key):
            environ[key] = value
            applied.append(key)
    if not applied:
        return None
    return f"using the running dev stack from {path} ({', '.join(applied)})"
