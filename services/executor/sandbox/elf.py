"""What decides which shared libraries an ELF file loads, read from its headers (no process runs).

The host's loader (through ldd) is the authority on which libraries a file loads; asking it costs a
process per file (~5 ms, some 300 files at an executor's start). Two files with the same loader,
class, machine, DT_NEEDED names and search paths (DT_RPATH, DT_RUNPATH, with the directory where
they say $ORIGIN) load the same libraries, so `linkage` gives that as a key and the loader is asked
once per key."""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

MAGIC = b"\x7fELF"
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 1, 5, 15, 29
MAX_HEADERS = 512


class NotElf(Exception):
    """The file is not an ELF object: the loader loads nothing for it."""


Linkage = tuple[object, ...]


def linkage(path: str) -> Linkage:
    """A key equal for two files exactly when the loader resolves the same libraries for both.
    Raises NotElf for a file that is not ELF, and ValueError or OSError for one it cannot read."""
    with open(path, "rb") as file:
        ident = file.read(16)
        if len(ident) < 16 or ident[:4] != MAGIC:
            raise NotElf(path)
        if ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise ValueError(f"{path}: unknown ELF class or byte order")
        wide, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
        if wide:
            header = _unpack(file, f"{order}HHIQQQIHHH", 16)
            machine, phoff, phentsize, phnum = header[1], header[4], header[8], header[9]
            program_header = f"{order}IIQQQQQQ"  # type, flags, offset, vaddr, paddr, filesz, memsz, align
        else:
            header = _unpack(file, f"{order}HHIIIIIHHH", 16)
            machine, phoff, phentsize, phnum = header[1], header[4], header[8], header[9]
            program_header = f"{order}IIIIIIII"  # type, offset, vaddr, paddr, filesz, memsz, flags, align
        if phnum > MAX_HEADERS:
            raise ValueError(f"{path}: {phnum} program headers")
        loads: list[tuple[int, int, int]] = []  # (vaddr, offset, size in the file)
        dynamic: tuple[int, int] | None = None
        interpreter = b""
        for index in range(phnum):
            fields = _unpack(file, program_header, phoff + index * phentsize)
            if wide:
                kind, offset, vaddr, filesz = fields[0], fields[2], fields[3], fields[5]
            else:
                kind, offset, vaddr, filesz = fields[0], fields[1], fields[2], fields[4]
            if kind == PT_LOAD:
                loads.append((vaddr, offset, filesz))
            elif kind == PT_DYNAMIC:
                dynamic = (offset, filesz)
            elif kind == PT_INTERP:
                file.seek(offset)
                interpreter = file.read(min(filesz, 4096)).rstrip(b"\0")
        if dynamic is None:
            return (ident[4], machine, interpreter, "static")
        entries = _dynamic_entries(file, order, wide, *dynamic)
        strtab = next((value for tag, value in entries if tag == DT_STRTAB), None)
        if strtab is None:
            raise ValueError(f"{path}: no string table")
        table = _file_offset(loads, strtab, path)

        def names(tag: int) -> tuple[bytes, ...]:
            return tuple(_string(file, table + value) for kind, value in entries if kind == tag)

        needed = frozenset(names(DT_NEEDED))
        search = (names(DT_RPATH), names(DT_RUNPATH))
        origin = (
            os.path.dirname(os.path.realpath(path))
            if any(b"ORIGIN" in s for p in search for s in p)
            else None
        )
        return (ident[4], machine, interpreter, needed, search, origin)


def _unpack(file: BinaryIO, layout: str, offset: int) -> tuple[int, ...]:
    file.seek(offset)
    size = struct.calcsize(layout)
    data = file.read(size)
    if len(data) != size:
        raise ValueError("truncated ELF header")
    return struct.unpack(layout, data)


def _dynamic_entries(file: BinaryIO, order: str, wide: bool, offset: int, size: int) -> list[tuple[int, int]]:
    entry = f"{order}qQ" if wide else f"{order}iI"
    step = struct.calcsize(entry)
    file.seek(offset)
    data = file.read(min(size, 65536))
    entries = []
    for start in range(0, len(data) - step + 1, step):
        tag, value = struct.unpack_from(entry, data, start)
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    return entries


def _file_offset(loads: list[tuple[int, int, int]], address: int, path: str) -> int:
    for vaddr, offset, size in loads:
        if vaddr <= address < vaddr + size:
            return address - vaddr + offset
    raise ValueError(f"{path}: the string table is outside every loaded segment")


def _string(file: BinaryIO, offset: int) -> bytes:
    file.seek(offset)
    data = file.read(4096)
    end = data.find(b"\0")
    if end < 0:
        raise ValueError("unterminated string in the ELF string table")
    return data[:end]
