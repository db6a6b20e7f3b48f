"""Server settings: one ``Settings`` class read from ``FLEETCAST_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the server is configured with. Later issues add fields here."""

    model_config = SettingsConfigDict(env_prefix="FLEETCAST_", extra="ignore")

    #: Where the server keeps its state; the image store lives in ``data_dir / "images"``.
    data_dir: Path = Field(default=Path("./data"), validation_alias="FLEETCAST_DATA")
    #: zstd level for captures and imports (1 fastest .. 19 smallest).
    compression_level: int = Field(default=3, ge=1, le=19)
    #: Threads hashing and compressing blocks during a capture (0: one per CPU plus two).
    capture_threads: int = Field(default=0, ge=0, le=256)

    # -- the control plane (issue 4) -----------------------------------------------------
    #: SQLAlchemy URL of the database; empty: an SQLite file ``fleetcast.db`` in data_dir.
    #: PostgreSQL: ``postgresql+psycopg://user:password@host/dbname``.
    database_url: str = Field(default="")
    #: Shared secret agents present (boot parameter) to enroll and get their own credential.
    #: Empty: agents cannot enroll until it is set.
    enrollment_token: str = Field(default="")
    #: Address and port ``fleetcast server`` listens on.
    host: str = Field(default="127.0.0.1")
    port: int = Field(default=8080, ge=1, le=65535)
    #: Network interface the multicast senders send on (e.g. the lab's NIC).
    multicast_iface: str = Field(default="")
    #: Sessions get groups 239.<prefix>.X.Y and UDP ports from this base upwards.
    multicast_prefix: int = Field(default=192, ge=0, le=255)
    multicast_base_port: int = Field(default=9000, ge=1024, le=60000)
    #: Multicast TTL of the senders (1: never leaves the LAN).
    multicast_ttl: int = Field(default=1, ge=1, le=255)
    #: Agents send progress at most this often (seconds); the server tells them.
    progress_interval: float = Field(default=1.0, ge=0.2, le=60.0)
    #: After a sender ends, wait this long for the agents' final results.
    result_grace: float = Field(default=15.0, ge=0.0, le=600.0)
    #: Catch-up (issue 9, docs/SERVER.md): a machine evicted from the multicast transfer,
    #: or one that boots after it, fetches the blocks over HTTP and the verdict waits for it.
    catchup: bool = True
    #: A catching-up machine without progress for this long (seconds) fails.
    catchup_timeout: float = Field(default=900.0, ge=1.0, le=86_400.0)
    #: The sender evicts a machine still incomplete this long (seconds) after every other
    #: one completed (the engine's straggler_grace); with catch-up it finishes over HTTP.
    straggler_grace: float = Field(default=30.0, ge=0.0, le=86_400.0)
    #: Tag every multicast DATA datagram (docs/PROTOCOL.md §6.1). Off: blocks are
    #: authenticated by the manifest's hashes and only blocks a receiver reports spoiled are
    #: sent tagged (cheaper per datagram at both ends); on: a forger on the lab's LAN cannot
    #: even make a machine fetch a block twice.
    tag_data: bool = False
    #: Queue length of each live event stream subscriber (slow ones lose the oldest).
    event_queue_size: int = Field(default=256, ge=8, le=100_000)
    #: Apply pending schema migrations when the server starts.
    migrate_on_start: bool = True

    # -- network boot (issue 7, docs/PXE.md) ---------------------------------------------
    #: Serve ``GET /boot/ipxe`` and ``/boot/files/*`` (public: iPXE sends no token, and the
    #: script of a machine due for a deployment carries the enrollment token). Off unless
    #: the site network-boots its machines.
    boot_enabled: bool = False
    #: Directory holding the client boot image (``vmlinuz``, ``initrd.img``); empty:
    #: ``data_dir / "boot"``.
    boot_dir: str = Field(default="")
    #: URL the booting machines reach this server at (goes into the scripts and on the
    #: client's kernel command line); empty: the URL the iPXE request came to.
    boot_server_url: str = Field(default="", pattern=r"^(https?://[A-Za-z0-9.:\[\]_-]+)?$")
    #: What an unknown machine does after it is registered: ``local`` (boot its disk) or
    #: ``menu`` (a short iPXE menu: local disk, or the client to take inventory and wait).
    boot_unknown: Literal["local", "menu"] = "local"
    #: Seconds the menu waits before it boots the local disk.
    boot_menu_timeout: float = Field(default=5.0, ge=0.0, le=600.0)
    #: Which disk the client writes: ``auto`` (the only fixed disk; refuses when there are
    #: several), a device (``sda``, ``/dev/nvme0n1``), ``model:TEXT``, ``serial:TEXT``,
    #: ``largest`` or ``smallest``.
    boot_disk: str = Field(default="auto", pattern=r"^[A-Za-z0-9._~+/=:@%-]+$")
    #: What the client does after a deployment: ``reboot`` (into the new system) or
    #: ``poweroff``.
    boot_after: Literal["reboot", "poweroff"] = "reboot"
    #: Extra kernel arguments for the client, e.g. ``console=ttyS0,115200``.
    boot_kernel_args: str = Field(default="", pattern=r"^[A-Za-z0-9._~+/=:@%, -]*$")

    # -- schedules and Wake-on-LAN (issue 5, docs/SCHEDULING.md) ---------------------------
    #: Run the scheduler (schedules fire, machines are woken).
    scheduler_enabled: bool = True
    #: Seconds between the scheduler's looks at the schedules.
    scheduler_tick: float = Field(default=5.0, ge=0.05, le=300.0)
    #: Where magic packets go when a group names no broadcast address and port of its own.
    wol_broadcast: str = Field(default="255.255.255.255", max_length=45)
    wol_port: int = Field(default=9, ge=1, le=65535)
    #: Each machine's magic packet is sent this many times, this many seconds apart.
    wol_repeats: int = Field(default=3, ge=1, le=20)
    wol_interval: float = Field(default=0.5, ge=0.0, le=10.0)

    @property
    def image_root(self) -> Path:
        """The image store's directory."""
        return self.data_dir / "images"

    @property
    def boot_files_dir(self) -> Path:
        """Where the client boot image's files are served from."""
        return Path(self.boot_dir) if self.boot_dir else self.data_dir / "boot"

    @property
    def db_url(self) -> str:
        """The database URL in use (``database_url`` or the SQLite file in data_dir)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fleetcast.db').resolve()}"
