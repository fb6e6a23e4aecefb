"""Provider configuration, read from the variables the LLM ecosystem already uses.

Built in: ``openai`` (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``), ``anthropic``
(``ANTHROPIC_API_KEY``, ``ANTHROPIC_BASE_URL``), ``openrouter`` (``OPENROUTER_API_KEY``,
``OPENROUTER_BASE_URL``) and ``ollama`` (``OLLAMA_HOST``). More endpoints come from
``LLMSTREAM_PROVIDERS`` (a JSON object) and ``LLMSTREAM_PROVIDERS_FILE`` (JSON or TOML of the
same shape)::

    {"vllm": {"kind": "openai", "base_url": "http://gpu-1:8000/v1",
              "api_key": "...", "headers": {"X-Team": "search"}}}

An entry in ``LLMSTREAM_PROVIDERS`` replaces a file entry of the same name; neither may reuse a
built-in name.

A built-in provider is registered only when it is configured, so no request can make a worker
call an endpoint nobody set up: ``openai`` with ``OPENAI_API_KEY`` or a changed
``OPENAI_BASE_URL`` (a local server often needs no key), ``anthropic`` with
``ANTHROPIC_API_KEY`` or a changed ``ANTHROPIC_BASE_URL``, ``openrouter`` with
``OPENROUTER_API_KEY``, ``ollama`` with ``OLLAMA_HOST``. Extra endpoints are configured by
definition. A request for an unconfigured built-in fails at once with the variable to set.

Keys are ``SecretStr`` and extra headers are left out of the repr, since they often carry
credentials too. Constructor arguments override the environment.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from yarl import URL

from llmstream.core.settings import load_object_file, redact_url
from llmstream.processors.providers import Provider, ProviderRouter
from llmstream.processors.providers.anthropic import AnthropicMessages
from llmstream.processors.providers.openai import OpenAICompatible
from llmstream.processors.providers.pool import ConnectionPool

__all__ = ["BUILTIN_PROVIDERS", "EndpointConfig", "ProviderSettings", "build_router"]

BUILTIN_PROVIDERS = ("anthropic", "ollama", "openai", "openrouter")
OPENAI_BASE_URL = "https://api.openai.com/v1"
ANTHROPIC_BASE_URL = "https://api.anthropic.com"
# A name is the prefix of "<name>/<model>", so it cannot hold a slash.
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def _check_base_url(value: str) -> str:
    try:
        url = URL(value)
    except ValueError:
        url = URL()
    if url.scheme not in ("http", "https") or not url.host:
        # Redacted: a URL may carry credentials (https://user:key@host).
        raise ValueError(
            f"a base URL must be http(s)://host[:port][/path], got {redact_url(value)!r}"
        )
    return value.rstrip("/")


def _check_one_credential(name: str, base_url: str, api_key: SecretStr | None) -> None:
    """An OpenAI-style key is sent as ``Authorization: Bearer``; a user and password in the base
    URL would be sent in the same header: both cannot be, so the configuration must pick one."""
    if api_key is not None and (URL(base_url).user or URL(base_url).password):
        raise ValueError(
            f"{name} carries a user or password and an API key is set too: both would be sent "
            "in the Authorization header; give one of them"
        )


class EndpointConfig(BaseModel):
    """One extra endpoint: which wire format it speaks, where, and with which credentials."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["openai", "anthropic"]
    base_url: str
    api_key: SecretStr | None = None
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    # The models served there, for GET /v1/models (llmstream.core.catalog); optional.
    models: list[str] = Field(default_factory=list)

    @field_validator("base_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        return _check_base_url(value)

    @model_validator(mode="after")
    def _one_credential(self) -> EndpointConfig:
        if self.kind == "openai":
            _check_one_credential("base_url", self.base_url, self.api_key)
        return self


class ProviderSettings(BaseSettings):
    """Where each provider lives, its credentials, and the HTTP client's limits."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    openai_api_key: SecretStr | None = None
    openai_base_url: str = OPENAI_BASE_URL
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str = ANTHROPIC_BASE_URL
    openrouter_api_key: SecretStr | None = None
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    # No default: Ollama is called only where someone said it runs.
    ollama_host: str | None = None

    providers: dict[str, EndpointConfig] = Field(
        default_factory=dict, validation_alias="LLMSTREAM_PROVIDERS"
    )
    providers_file: Path | None = Field(default=None, validation_alias="LLMSTREAM_PROVIDERS_FILE")
    timeout_s: float = Field(default=120.0, gt=0, validation_alias="LLMSTREAM_PROVIDER_TIMEOUT_S")
    max_connections: int = Field(
        default=1000, ge=1, validation_alias="LLMSTREAM_PROVIDER_MAX_CONNECTIONS"
    )
    anthropic_default_max_tokens: int = Field(
        default=4096, ge=1, validation_alias="LLMSTREAM_ANTHROPIC_DEFAULT_MAX_TOKENS"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # pydantic-settings deep-merges dict fields across sources, so `providers={}` would
        # still pick up LLMSTREAM_PROVIDERS; a constructor argument must replace it instead.
        return (
            init_settings,
            _UnlessGiven(env_settings, init_settings),
            _UnlessGiven(dotenv_settings, init_settings),
            file_secret_settings,
        )

    @field_validator("ollama_host", mode="before")
    @classmethod
    def _ollama_scheme(cls, value: Any) -> Any:
        # Ollama accepts OLLAMA_HOST without a scheme ("0.0.0.0:11434"); so do we.
        if isinstance(value, str) and "://" not in value:
            return f"http://{value}"
        return value

    @field_validator("openai_base_url", "anthropic_base_url", "openrouter_base_url", "ollama_host")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_base_url(value)

    def unconfigured(self) -> dict[str, str]:
        """The built-in providers without configuration, each with the variable to set."""
        missing: dict[str, str] = {}
        if self.openai_api_key is None and self.openai_base_url == OPENAI_BASE_URL:
            missing["openai"] = "OPENAI_API_KEY (or OPENAI_BASE_URL for a server without keys)"
        if self.anthropic_api_key is None and self.anthropic_base_url == ANTHROPIC_BASE_URL:
            missing["anthropic"] = "ANTHROPIC_API_KEY"
        if self.openrouter_api_key is None:
            missing["openrouter"] = "OPENROUTER_API_KEY"
        if self.ollama_host is None:
            missing["ollama"] = "OLLAMA_HOST"
        return missing

    @model_validator(mode="after")
    def _one_credential(self) -> ProviderSettings:
        _check_one_credential("OPENAI_BASE_URL", self.openai_base_url, self.openai_api_key)
        _check_one_credential(
            "OPENROUTER_BASE_URL", self.openrouter_base_url, self.openrouter_api_key
        )
        return self

    @model_validator(mode="after")
    def _merge_file(self) -> ProviderSettings:
        merged = _load_file(self.providers_file) if self.providers_file else {}
        merged.update(self.providers)
        for name in merged:
            if name in BUILTIN_PROVIDERS:
                raise ValueError(f"extra provider {name!r} reuses a built-in provider name")
            if not _NAME.match(name):
                raise ValueError(
                    f"provider name {name!r} must be lowercase letters, digits, '_', '.', '-'"
                )
        self.providers = merged
        return self


class _UnlessGiven(PydanticBaseSettingsSource):
    """``source`` without the fields the constructor was given."""

    def __init__(self, source: PydanticBaseSettingsSource, given: PydanticBaseSettingsSource):
        super().__init__(source.settings_cls)
        self._source = source
        self._given = given

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        given = self._given()
        return {key: value for key, value in self._source().items() if key not in given}


def _load_file(path: Path) -> dict[str, EndpointConfig]:
    """Read a JSON or TOML file of endpoints (by suffix; anything but .toml is JSON)."""
    raw = load_object_file(path, "LLMSTREAM_PROVIDERS_FILE", "endpoints")
    return {name: EndpointConfig.model_validate(entry) for name, entry in raw.items()}


def build_router(
    settings: ProviderSettings, client: aiohttp.ClientSession, pool: ConnectionPool | None = None
) -> ProviderRouter:
    """Every configured provider, all sharing ``client`` (and ``pool``, for non-streamed calls);
    the unconfigured built-ins are only named, with the variable each needs."""
    builtin: dict[str, Callable[[], Provider]] = {
        "openai": lambda: OpenAICompatible(
            "openai", client, settings.openai_base_url, settings.openai_api_key, pool=pool
        ),
        "anthropic": lambda: AnthropicMessages(
            "anthropic",
            client,
            settings.anthropic_base_url,
            settings.anthropic_api_key,
            default_max_tokens=settings.anthropic_default_max_tokens,
            pool=pool,
        ),
        "openrouter": lambda: OpenAICompatible(
            "openrouter",
            client,
            settings.openrouter_base_url,
            settings.openrouter_api_key,
            pool=pool,
        ),
        "ollama": lambda: OpenAICompatible(
            "ollama", client, f"{settings.ollama_host}/v1", pool=pool
        ),
    }
    missing = settings.unconfigured()
    providers = {name: build() for name, build in builtin.items() if name not in missing}
    for name, endpoint in settings.providers.items():
        if endpoint.kind == "anthropic":
            providers[name] = AnthropicMessages(
                name,
                client,
                endpoint.base_url,
                endpoint.api_key,
                endpoint.headers,
                default_max_tokens=settings.anthropic_default_max_tokens,
                pool=pool,
            )
        else:
            providers[name] = OpenAICompatible(
                name, client, endpoint.base_url, endpoint.api_key, endpoint.headers, pool=pool
            )
    return ProviderRouter(providers, missing)
