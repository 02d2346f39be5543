"""Settings read from the environment (prefix GGUFCHAT_); the one place the environment is read."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GGUFCHAT_", extra="ignore")

    home: Path = Field(
        default=Path("~/.cache/ggufchat").expanduser(),
        description="Cache folder for downloaded models and manifests.",
    )
    model: str | None = Field(default=None, description="Model used when a verb names none.")
    debug: bool = Field(default=False, description="Show tracebacks and llama.cpp's own log.")
    offline: bool = Field(default=False, description="Resolve models from the cache only.")
    hf_endpoint: str | None = Field(default=None, description="Hugging Face endpoint (default: HF_ENDPOINT "
                                    "or huggingface.co).")
    ms_endpoint: str | None = Field(default=None, description="ModelScope endpoint (default: MODELSCOPE_ENDPOINT "
                                    "or www.modelscope.cn).")


def load_settings() -> Settings:
    return Settings()
