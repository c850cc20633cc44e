"""What a zip archive's end record declares about its central directory, read before zipfile parses the directory.

zipfile.ZipFile reads the whole central directory into memory and makes one ZipInfo object per entry, so a small
file whose directory lists a million entries costs hundreds of MiB and seconds of CPU before anything can refuse
it. The end-of-central-directory record (the last bytes of the file; its zip64 form included) declares the
directory's size and entry count: callers (the model inspector, the dataset validator) read it first and refuse an
archive whose directory is too large for what they expect to find in it.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import BinaryIO


@dataclass(frozen=True)
class ZipDirectory:
    entries: int  # entries the end record declares
    size: int  # bytes of the central directory: what zipfile would read and parse


def zip_directory(f: BinaryIO) -> ZipDirectory:
    """The central directory declared by the end record of the open archive ``f`` (seekable); raises
    zipfile.BadZipFile when there is none. Reads at most the last 64 KiB (the record and its comment), with the same
    (private) helper zipfile uses to locate the directory, so both read the same record."""
    end = zipfile._EndRecData(f)
    if end is None:
        raise zipfile.BadZipFile("no end of central directory record")
    return ZipDirectory(entries=int(end[zipfile._ECD_ENTRIES_TOTAL]), size=int(end[zipfile._ECD_SIZE]))
