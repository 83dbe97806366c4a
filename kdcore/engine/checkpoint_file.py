"""Reading any checkpoint file safely: its format, the CRC-32 of every member of
its zip archive, then ``torch.load(weights_only=True)``.

``torch.load`` does not check the CRC-32s that ``torch.save`` writes, so a
flipped byte inside a tensor's data would load as a wrong weight; every member
is checked first (about as fast as reading the file, see
``benchmarks/bench_checkpoint_verify.py``). Nothing is unpickled before the
format is known to be good.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
_CHUNK = 1 << 20  # bytes per read: large enough to amortise the calls, small enough to stay in cache


class DamagedFile(ValueError):
    """A checkpoint whose bytes are not those written: truncated, or a member that
    fails its CRC-32 check (the reason, in one line, is the message)."""


def _member_problem(f, info: zipfile.ZipInfo, buffer: memoryview) -> str | None:
    """Why the stored member ``info`` of the open archive ``f`` is damaged (None: intact),
    read in chunks through ``buffer``."""
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != b"PK\x03\x04":
        return f"member {info.filename!r} has a damaged header"
    _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    f.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
    left, crc = info.compress_size, 0
    while left:
        got = f.readinto(buffer[:min(left, _CHUNK)])
        if not got:
            return f"member {info.filename!r} is cut short (the file is truncated)"
        crc, left = zlib.crc32(buffer[:got], crc), left - got
    return None if crc == info.CRC else f"member {info.filename!r} fails its CRC-32 check"


def _compressed_member_problem(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    """Like :func:`_member_problem` for a compressed member (zipfile checks the CRC-32)."""
    try:
        with archive.open(info) as member:
            while member.read(_CHUNK):
                pass
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError):
        return f"member {info.filename!r} fails its CRC-32 check"
    return None


def verify_members(path: Path) -> None:
    """Check every member of the zip archive ``path`` against its CRC-32;
    :class:`DamagedFile` names the first damaged member."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DamagedFile(f"the file is truncated or damaged ({exc})") from None
    buffer = memoryview(bytearray(_CHUNK))
    with archive, path.open("rb", buffering=0) as f:
        for info in archive.infolist():
            if info.compress_type == zipfile.ZIP_STORED:
                problem = _member_problem(f, info, buffer)
            else:
                problem = _compressed_member_problem(archive, info)
            if problem:
                raise DamagedFile(f"{problem}: the file is damaged")


def _check_format(path: Path) -> None:
    """Raise (:class:`ValueError`, :class:`DamagedFile`) what is wrong with the file's
    format and bytes, found without unpickling anything."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise DamagedFile("the file is empty")
    if head.startswith(b"PK"):  # torch.save's zip format
        verify_members(path)
    elif head[:1] != b"\x80":  # nor the legacy pickle-based format (which holds no checksums)
        raise ValueError("not a PyTorch checkpoint (it does not start like one)")


def _why_unreadable(exc: BaseException) -> ValueError:
    """What ``torch.load`` refused, in one line (:class:`DamagedFile` unless it was the content)."""
    message = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in message:
        found = [line.strip() for line in message.splitlines() if "Unsupported" in line]
        return ValueError("it holds objects other than tensors, refused by weights_only=True" + (
            f" ({found[0].split('. ')[0]})" if found else ""))
    first = message.splitlines()[0].split(". ")[0] if message else ""
    return DamagedFile(f"the file is truncated or damaged ({type(exc).__name__}{': ' + first if first else ''})")


def read_checkpoint(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, after the checks above;
    ``ValueError`` with the reason on failure (:class:`DamagedFile` where the
    file's bytes are damaged)."""
    if path.is_dir():
        raise ValueError("it is a directory, not a file")
    if not path.is_file():
        raise ValueError("it is not a regular file (reading a pipe or a device would wait for ever)")
    _check_format(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, damaged members, non-weights content
        raise _why_unreadable(exc) from None
