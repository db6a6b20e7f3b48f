"""Server settings: one ``Settings`` class read from ``FLEETCAST_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the server is configured with. Later issues add fields here."""

    model_config = SettingsConfigDict(env_prefix="FLEETCAST_", extra="ignore")

    #: Where the server keeps its state; the image store lives in ``data_dir / "images"``.
    data_dir: Path = Field(default=Path("./data"), validation_alias="FLEETCAST_DATA")
    #: zstd level for captures and imports (1 fastest .. 19 smallest).
    compression_level: int = Field(default=3, ge=1, le=19)
    #: Threads hashing and compressing blocks during a capture (0: one per CPU).
    capture_threads: int = Field(default=0, ge=0, le=256)

    @property
    def image_root(self) -> Path:
        """The image store's directory."""
        return self.data_dir / "images"
