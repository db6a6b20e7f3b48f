"""``fleetcast image ...``: capture, import, list, info, verify, export, delete, gc.

The store lives in ``$FLEETCAST_DATA/images`` (default ``./data/images``). Every failure
prints one line starting with ``fleetcast image:`` on stderr and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from protocol.manifest import DEFAULT_BLOCK_SIZE, BlockKind, Manifest
from server.config import Settings
from server.images.capture import CaptureOptions, CaptureResult, capture_image
from server.images.export import export_image, verify_image
from server.images.importer import import_image
from server.images.store import ImageStore, StoreError


def human(n: float) -> str:
    """Bytes as a short human-readable size (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def parse_size(text: str) -> int:
    """``1M``, ``256K``, ``4MiB`` or a byte count."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMG" else t
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 1M or 256K")
    return int(digits) * mult


def _warn(msg: str) -> None:
    print(f"fleetcast image: warning: {msg}", file=sys.stderr)


def _options(a: argparse.Namespace) -> CaptureOptions:
    return CaptureOptions(
        level=a.level,
        used_only=False if a.all_blocks else None,
        block_size=a.block_size,
        threads=a.threads,
    )


def _report_capture(r: CaptureResult) -> None:
    m = r.manifest
    rate = m.image_size / r.seconds / 1e6 if r.seconds > 0 else 0.0
    print(
        f"captured {r.name}: {human(m.image_size)} in {r.seconds:.1f} s ({rate:.0f} MB/s), "
        f"stored {human(m.stored_bytes)} ({_ratio(m)}), {r.new_blocks} new blocks "
        f"({human(r.new_bytes)}), digest {r.digest.hex()}"
    )


def _ratio(m: Manifest) -> str:
    return f"{m.stored_bytes / m.image_size * 100:.1f}% of raw"


def cmd_capture(store: ImageStore, a: argparse.Namespace) -> int:
    _report_capture(capture_image(store, a.name, Path(a.source), _options(a), warn=_warn))
    return 0


def cmd_import(store: ImageStore, a: argparse.Namespace) -> int:
    _report_capture(import_image(store, a.name, Path(a.file), _options(a), warn=_warn))
    return 0


def cmd_list(store: ImageStore, a: argparse.Namespace) -> int:
    images = store.list_images()
    if not images:
        print(f"no images in {store.root}")
        return 0
    rows = [("NAME", "SIZE", "STORED", "RATIO", "DATA/ZERO/UNUSED", "CREATED", "DIGEST")]
    for info in images:
        m = info.manifest
        kinds = "/".join(str(m.count(k)) for k in BlockKind)
        rows.append(
            (
                info.name,
                human(m.image_size),
                human(m.stored_bytes),
                f"{m.stored_bytes / m.image_size:.3f}",
                kinds,
                m.created,
                info.digest.hex()[:16],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_info(store: ImageStore, a: argparse.Namespace) -> int:
    data, m = store.load_manifest(a.name)
    if a.json:
        print(json.dumps({k: v for k, v in json.loads(data).items() if k != "blocks"}, indent=2))
        return 0
    unique = m.unique_digests()
    unique_bytes = sum(store.block_path(d).stat().st_size for d in unique if store.has_block(d))
    print(f"image      {a.name}\ndigest     {m.digest().hex()}\ncreated    {m.created}")
    print(f"source     {m.source.get('path', '?')} ({m.source.get('kind', '?')})")
    print(
        f"size       {human(m.image_size)} ({m.image_size} bytes), "
        f"{m.block_count} blocks of {human(m.block_size)}"
    )
    print(
        f"blocks     data {m.count(BlockKind.DATA)} (raw {sum(1 for b in m if b.is_raw)}), "
        f"zero {m.count(BlockKind.ZERO)}, unused {m.count(BlockKind.UNUSED)}"
    )
    print(
        f"stored     {human(m.stored_bytes)} ({_ratio(m)}), {len(unique)} unique blocks "
        f"taking {human(unique_bytes)}; data covers {human(m.data_bytes())}"
    )
    print(f"zstd       level {m.compression.get('level')}\nsha256     {m.image_sha256.hex()}")
    print(f"partitions {m.partition_table}")
    for p in m.partitions:
        used = "" if p.used_bytes is None else f", {human(p.used_bytes)} used"
        print(
            f"  {p.number:>3}  start {p.start:>14}  {human(p.size):>10}  {p.fs or '?':<6} "
            f"label={p.label!r} map={p.used_map}{used}"
        )
    return 0


def cmd_verify(store: ImageStore, a: argparse.Namespace) -> int:
    report = verify_image(store, a.name)
    for p in report.problems:
        print(f"image {a.name}: block {p.index} (offset {p.offset}): {p.message}", file=sys.stderr)
    if not report.problems and not report.image_hash_ok:
        print(f"image {a.name}: whole-image SHA-256 does not match the manifest", file=sys.stderr)
    if not report.ok:
        print(
            f"fleetcast image: {a.name} is DAMAGED ({len(report.problems)} bad blocks)",
            file=sys.stderr,
        )
        return 1
    print(f"{a.name}: OK ({report.blocks_checked} data blocks and the whole-image hash checked)")
    return 0


def cmd_export(store: ImageStore, a: argparse.Namespace) -> int:
    r = export_image(store, a.name, Path(a.out), overwrite=a.overwrite)
    note = (
        ""
        if r.skipped_unused == 0
        else (f"; {r.skipped_unused} unused blocks not written (they keep the target's old bytes)")
    )
    print(f"exported {a.name} to {a.out}: {human(r.written_bytes)} written{note}")
    return 0


def cmd_delete(store: ImageStore, a: argparse.Namespace) -> int:
    r = store.delete_image(a.name)
    print(f"deleted {a.name}: freed {r.blocks_removed} blocks ({human(r.bytes_removed)})")
    return 0


def cmd_gc(store: ImageStore, a: argparse.Namespace) -> int:
    r = store.gc()
    print(
        f"gc: removed {r.blocks_removed} unreferenced blocks ({human(r.bytes_removed)}) "
        f"and {r.temp_files_removed} temp files"
    )
    return 0


def _capture_args(p: argparse.ArgumentParser, settings: Settings) -> None:
    p.add_argument("--name", required=True, help="image name (letters, digits, ._-/)")
    p.add_argument(
        "--level",
        type=int,
        default=settings.compression_level,
        help="zstd level 1..19 (default %(default)s)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--used-only",
        action="store_true",
        help="skip blocks filesystems do not use (default when supported)",
    )
    g.add_argument("--all-blocks", action="store_true", help="keep every block")
    p.add_argument(
        "--block-size",
        type=parse_size,
        default=DEFAULT_BLOCK_SIZE,
        help="block size, multiple of 4 KiB (default 1M)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=settings.capture_threads,
        help="hashing/compression threads (default: one per CPU plus two)",
    )


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    settings = settings or Settings()
    parser = argparse.ArgumentParser(prog="fleetcast image", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("capture", help="capture a raw disk image file or block device")
    p.add_argument("source", metavar="SRC")
    _capture_args(p, settings)
    p.set_defaults(func=cmd_capture)
    p = sub.add_parser("import", help="import a qcow2/VMDK/VHD(X)/raw file via qemu-img")
    p.add_argument("file", metavar="FILE")
    _capture_args(p, settings)
    p.set_defaults(func=cmd_import)
    sub.add_parser("list", help="list images").set_defaults(func=cmd_list)
    p = sub.add_parser("info", help="sizes, ratio, kinds of blocks, partitions")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="the manifest without its block table")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("verify", help="re-hash every stored block of an image")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("export", help="write an image back out to a raw file or device")
    p.add_argument("name", metavar="NAME")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--overwrite", action="store_true", help="write over an existing target")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("delete", help="delete an image and blocks no other image uses")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_delete)
    sub.add_parser("gc", help="remove unreferenced blocks and temp files").set_defaults(func=cmd_gc)
    return parser


def main(argv: Sequence[str]) -> int:
    """Run one ``fleetcast image`` sub-command; return the exit status."""
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        var = str(first["loc"][0]).upper()
        var = var if var.startswith("FLEETCAST_") else f"FLEETCAST_{var}"
        print(f"fleetcast image: bad setting {var}: {first['msg']}", file=sys.stderr)
        return 2
    try:
        a = build_parser(settings).parse_args(list(argv))
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    store = ImageStore(settings.image_root)
    func: Callable[[ImageStore, argparse.Namespace], int] = a.func
    try:
        return func(store, a)
    except StoreError as exc:
        print(f"fleetcast image: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"fleetcast image: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
