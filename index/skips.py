"""Why gallery entries are skipped: the reasons (`SKIP_REASONS`) and their counts (`SkipCounts`).

Every reader (`index.gallery`, `index.tar_reader`, `index.ranged`, `index.device_decode`) counts an entry
it does not turn into an image under one of these reasons; the counts travel in the index manifest,
the curated manifest and the summary lines.
"""
from __future__ import annotations

from collections import Counter

SKIP_REASONS: dict[str, str] = {
    "empty": "the image member/file has zero bytes",
    "truncated": "the image data ends early (PIL: 'image file is truncated', EOF)",
    "corrupt": "an image format was recognised but the data cannot be decoded "
               "(broken stream, bad CRC, unreadable header after a valid signature)",
    "not_image": "the sample has no jpg/jpeg/png/webp member, or its image bytes are not an image",
    "too_large": "width*height exceeds max_pixels (decompression-bomb guard; checked before decoding)",
    "too_small": "the shorter side is below min_side",
    "bad_meta": "the .json member is not a JSON object (bad JSON, another type, or nested too deeply to parse)",
    "duplicate_key": "a key already seen in this shard (the first occurrence is kept)",
    "missing": "read_images: a requested key is not in the shard",
    "tar_truncated": "the tar (or its gzip/bz2/xz stream) ends before its end-of-archive block (cut mid-file); "
                     "the sample being assembled at the cut is dropped and counted once; samples after the cut "
                     "are unknowable",
    "tar_corrupt": "the tar has an invalid header after valid members, or its compressed stream is damaged; "
                   "counted once per break, as above",
    "not_a_tar": "a file named .tar whose first block is neither a tar header nor a gzip/bz2/xz stream; "
                 "counted once, nothing in it is read",
    "empty_tar": "a file named .tar with zero bytes; counted once",
    "dangling_symlink": "folder gallery: a symlink whose target does not exist (never opened)",
    "not_regular_file": "folder gallery: a FIFO, device, socket or other non-regular file, directly or through "
                        "a symlink (e.g. to /dev/zero); never opened, so never read or waited on",
    "unreadable_file": "folder gallery: a regular file that cannot be opened or read (permissions, I/O error)",
    "stale_location": "a read by recorded location found the gallery changed since indexing: the file is gone "
                      "or shorter than offset+size, or the tar header before the bytes is not the member's",
    "changed": "a read by recorded location found bytes whose content hash differs from the one indexed "
               "(the image was replaced, even by one of the same size)",
}


class SkipCounts:
    """reason -> number of skipped gallery entries. Reasons are free strings (see SKIP_REASONS)."""

    def __init__(self, counts: dict[str, int] | None = None):
        self._c: Counter[str] = Counter()
        for reason, n in (counts or {}).items():
            self.add(reason, n)

    def add(self, reason: str, n: int = 1) -> None:
        if not reason:
            raise ValueError("skip reason must be a non-empty string")
        if n < 0:
            raise ValueError(f"skip count must be >= 0, got {n} for {reason!r}")
        if n:
            self._c[reason] += n

    def merge(self, other: "SkipCounts | dict[str, int]") -> "SkipCounts":
        items = other.to_dict() if isinstance(other, SkipCounts) else other
        for reason, n in items.items():
            self.add(reason, n)
        return self

    @property
    def total(self) -> int:
        return sum(self._c.values())

    def __getitem__(self, reason: str) -> int:
        return self._c.get(reason, 0)

    def to_dict(self) -> dict[str, int]:
        return {k: self._c[k] for k in sorted(self._c)}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SkipCounts):
            return self.to_dict() == other.to_dict()
        if isinstance(other, dict):
            return self.to_dict() == {k: v for k, v in other.items() if v}
        return NotImplemented

    def __repr__(self) -> str:
        return f"SkipCounts({self.to_dict()})"
