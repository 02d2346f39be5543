"""Settings read from the environment; the one place the environment is read.

Our own variables carry the prefix GGUFCHAT_. A few conventions of other tools are read here too, under
their own names (validation_alias), so the modules that honour them take a Settings object instead of
reading os.environ: NO_COLOR (no-color.org), MODELSCOPE_ENDPOINT (the ModelScope client's), LLAMA_CACHE
and XDG_CACHE_HOME (where llama.cpp keeps its cache). An empty variable counts as unset, as every one of
those conventions has it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ggufchat.errors import InvalidParameter


class Settings(BaseSettings):
    # populate_by_name: tests and callers build Settings(ms_endpoint=...) by field name, aliases or not.
    model_config = SettingsConfigDict(env_prefix="GGUFCHAT_", extra="ignore", env_ignore_empty=True,
                                      populate_by_name=True)

    home: Path = Field(
        default=Path("~/.cache/ggufchat").expanduser(),
        description="Cache folder for downloaded models and manifests.",
    )
    model: str | None = Field(default=None, description="Model used when a verb names none.")
    debug: bool = Field(default=False, description="Show tracebacks and llama.cpp's own log.")
    offline: bool = Field(default=False, description="Resolve models from the cache only.")
    hf_endpoint: str | None = Field(default=None, description="Hugging Face endpoint (default: HF_ENDPOINT, "
                                    "which huggingface_hub reads itself, or huggingface.co).")
    ms_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("GGUFCHAT_MS_ENDPOINT", "MODELSCOPE_ENDPOINT"),
        description="ModelScope endpoint (default: MODELSCOPE_ENDPOINT or www.modelscope.cn).")
    no_color: bool = Field(default=False, validation_alias=AliasChoices("NO_COLOR"),
                           description="NO_COLOR set to anything: no colour in the terminal.")
    llama_cache: Path | None = Field(default=None, validation_alias=AliasChoices("LLAMA_CACHE"),
                                     description="llama.cpp's cache folder (the RPC worker's tensor cache).")
    xdg_cache_home: Path | None = Field(default=None, validation_alias=AliasChoices("XDG_CACHE_HOME"),
                                        description="The user's cache folder when LLAMA_CACHE is unset.")

    @field_validator("debug", mode="before")
    @classmethod
    def _lenient_debug(cls, value: object) -> object:
        # A debugging switch must never be what breaks the command: an unreadable value means off.
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on", "y", "t")
        return value

    @field_validator("no_color", mode="before")
    @classmethod
    def _any_value_is_set(cls, value: object) -> object:
        # no-color.org: present and not empty disables colour, whatever the value ("0" included).
        return bool(value) if isinstance(value, str) else value

    @property
    def llama_cache_dir(self) -> Path:
        """llama.cpp's cache folder, found as llama.cpp finds it: LLAMA_CACHE, else XDG_CACHE_HOME/llama.cpp,
        else ~/.cache/llama.cpp."""
        if self.llama_cache is not None:
            return self.llama_cache
        return (self.xdg_cache_home or Path.home() / ".cache") / "llama.cpp"


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        # One `Error:` line naming the variable, not a pydantic traceback.
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "the environment"
        raise InvalidParameter(f"{_env_name(name)}: {first['msg']}",
                               hint="Fix or unset that environment variable.") from None


def _env_name(field: str) -> str:
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"GGUFCHAT_{field.upper()}" if info else field
