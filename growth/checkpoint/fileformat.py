"""The checkpoint file: header, checksum and atomic writes.

Layout: a 56-byte header (magic, format version, payload length, SHA-256 of the payload)
followed by a ``torch.save`` payload of plain data and tensors. The header is read and checked
against the file's size before any of the payload is read. Writes go to a temporary file in the
target's directory (``.<name>.<pid>.<hex>.tmp``), flushed, ``fsync``-ed and renamed over the
target; temporary files left by writers that died are removed by the next save.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import struct
from typing import Any, BinaryIO

import torch

from ..errors import GrowthError

__all__ = ["FORMAT_VERSION", "KIND", "PathLike", "read_payload", "write_payload"]

FORMAT_VERSION = 1
KIND = "net2grow-checkpoint"
_MAGIC = b"\x89NET2GROW\r\n\x1a\n"
_HEADER = struct.Struct(f"<{len(_MAGIC)}sIQ32s")  # magic, version, payload length, sha256
_TMP = re.compile(r"\.(?P<base>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp")

PathLike = str | os.PathLike


class _HashingWriter:
    """File-like ``write``/``flush`` that hashes and counts what it forwards."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        self.f.write(view)
        return len(view)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but not ours, or cannot tell: leave its file alone
    return True


def remove_stale_temporaries(directory: str, base: str) -> list[str]:
    """Delete ``base``'s temporary files whose writer process no longer exists."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = _TMP.fullmatch(entry.name)
            if match and match["base"] == base and not _alive(int(match["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed


def write_payload(payload: dict[str, Any], path: PathLike) -> None:
    """Write header + ``torch.save(payload)`` atomically (temporary file, fsync, rename)."""
    target = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(target)
    remove_stale_temporaries(directory, base)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * _HEADER.size)
            writer = _HashingWriter(f)
            torch.save(payload, writer)
            f.seek(0)
            f.write(_HEADER.pack(_MAGIC, FORMAT_VERSION, writer.size, writer.sha.digest()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _corrupt(name: str, why: str) -> GrowthError:
    return GrowthError(f"{name}: net2grow checkpoint file is corrupt: {why}")


def read_payload(path: PathLike, map_location: Any = None) -> dict[str, Any]:
    """Check the header of ``path`` against its size, then its checksum, then load the payload
    with ``torch.load(weights_only=True)``. Nothing past the header is read from a file whose
    header is not a net2grow header or whose size disagrees with it."""
    name = os.fspath(path)
    try:
        f = open(name, "rb")  # noqa: SIM115 (closed below; errors become GrowthError)
    except OSError as exc:
        raise GrowthError(f"cannot open checkpoint {name}: {exc.strerror or exc}") from exc
    with f:
        header = f.read(_HEADER.size)
        if header[: len(_MAGIC)] != _MAGIC:
            if header and len(header) < len(_MAGIC) and _MAGIC.startswith(header):
                raise _corrupt(name, "truncated header")
            raise GrowthError(f"{name} is not a net2grow checkpoint (no net2grow header)")
        if len(header) < _HEADER.size:
            raise _corrupt(name, "truncated header")
        _, version, size, digest = _HEADER.unpack(header)
        if version > FORMAT_VERSION or version < 1:
            raise GrowthError(
                f"{name}: net2grow checkpoint format {version} is not supported (this net2grow "
                f"reads formats 1..{FORMAT_VERSION}); upgrade net2grow"
            )
        actual = os.fstat(f.fileno()).st_size - _HEADER.size
        if actual < size:
            raise _corrupt(name, f"truncated ({actual} of {size} payload bytes)")
        if actual > size:
            raise _corrupt(name, f"{actual - size} unexpected bytes after the payload")
        payload = f.read(size)
    if len(payload) != size:
        raise _corrupt(name, f"truncated while reading ({len(payload)} of {size} bytes)")
    if hashlib.sha256(payload).digest() != digest:
        raise _corrupt(
            name,
            "SHA-256 checksum mismatch (the file was modified or damaged after it was written)",
        )
    try:
        data = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise GrowthError(f"{name}: cannot read the checkpoint payload: {exc}") from exc
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise GrowthError(f"{name} is not a net2grow checkpoint (unexpected payload)")
    return data
