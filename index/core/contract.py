"""The data contract between stages, in one place: file layouts, record fields and id formats.

Gallery -> (index/) embedding shards + FAISS index -> (curation/) curated WebDataset shards ->
(distill/) runs. Every stage reads and writes only what is named here.

Gallery
    WebDataset tars as img2dataset writes them (``key.jpg|png|webp``, ``key.json``, optional
    ``key.txt``) or an image folder. Image id: ``"<shard>/<key>"`` where ``shard`` is the tar's file
    stem (``00003`` for ``00003.tar``) and ``key`` the sample's ``__key__``.

Index directory (``build-index --out DIR``)
    DIR/embeddings/<shard>/<encoder-slug>.npy   float16 [n, dim] L2-normalised, one per encoder
    DIR/embeddings/<shard>/rows.jsonl           one line per row: {"id", "crop", "recipe", "loc", "hash"}
                                                (ROW_FIELDS; "loc" is absent in indexes built before
                                                locations were recorded, ROWS_FORMAT 1, "hash" in
                                                those built before content hashes, ROWS_FORMAT <= 2)
    DIR/embeddings/<shard>/rows.offsets.npy     int64 [n + 1]: byte offset of each rows.jsonl line,
                                                then the file size, so row r is bytes
                                                [off[r], off[r + 1]) (absent in ROWS_FORMAT 1 indexes)
    DIR/embeddings/<shard>/done.json            written last: counts, fingerprint (over the config and
                                                "input", the digest of every byte of the gallery
                                                shard: index.gallery.shard_digest), encoders,
                                                "rows_format", ...
    DIR/faiss/trained.index                     the trained, empty index every group is filled from
                                                (IVF factories; manifest "shared_quantizer": true)
    DIR/faiss/trained.index.done.json           written last: fingerprint of shards + factory + seed
    DIR/faiss/group-<g>.index                   FAISS index over the combined vectors of a shard group
    DIR/manifest.json                           written last: see INDEX_MANIFEST_KEYS
    Row ids in the FAISS indexes are global: shard offset (from the manifest) + row in shard.

Curated directory (``curate --out DIR``)
    DIR/transfer-000000.tar ...   samples: ``<key>.jpg`` (crop, 224 px), ``<key>.json`` (TransferRecord)
    DIR/queries-000000.tar ...    samples: ``<key>.png`` (query image), ``<key>.cls`` (label int),
                                  ``<key>.json`` {"id", "label", "class_name"}
    DIR/queries.json              the draw: query set name, seed, classes, [{id, label}]
    DIR/manifest.json, DIR/report.html
    DIR/.curate/<stage>.json      one record per finished stage of the run (curation/run/): the
                                  stage, the fingerprint of its inputs, its small result (ids,
                                  scores, thresholds, counts); arrays in DIR/.curate/<stage>.npz,
                                  written before the JSON. A rerun reuses the records whose
                                  fingerprint matches and recomputes from the first that does not.
    DIR/.curate/report-thumbs.tar an output of the write stage: the report's thumbnails of the
                                  written crops and originals it shows (curation/report_thumbs.py),
                                  so the report reads from the gallery only images never written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------- gallery ids

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def image_id(shard: str, key: str) -> str:
    return f"{shard}/{key}"


def split_image_id(iid: str) -> tuple[str, str]:
    shard, _, key = iid.partition("/")
    return shard, key


# ---------------------------------------------------------------- index directory

EMBEDDINGS_DIR = "embeddings"
FAISS_DIR = "faiss"
ROWS_FILE = "rows.jsonl"
ROWS_OFFSETS_FILE = "rows.offsets.npy"
DONE_FILE = "done.json"

# 1: rows {"id", "crop", "recipe"}; 2: + "loc" and the line-offset table; 3: + "hash". Part of every
# embedding shard's fingerprint, so a shard written in another format is refused, never silently
# reused; indexes of older formats are still read (without "hash": changed images go unnoticed, with
# a warning).
ROWS_FORMAT = 3

ROW_FIELDS = (
    "id",       # gallery image id "<shard>/<key>"
    "crop",     # crop index within the image
    "recipe",   # CropRecipe.to_dict()
    "loc",      # where the image's bytes live in its gallery shard (ROW_LOC_FIELDS), or null where
                # they cannot be sought (a compressed tar stream): the image is then read by scanning
    "hash",     # blake2b-128 hex of the image member's stored bytes (index.content.image_hash); every
                # later read compares it, so an image replaced since indexing is 'changed', not used
)

# The "loc" of a row: every later read of a gallery image seeks to exactly these bytes (index.ranged).
ROW_LOC_FIELDS = {
    "tar": (
        "offset",   # int: byte offset of the image member's data in the tar (TarInfo.offset_data);
                    # its 512-byte header block ends there and is read back to check the location
        "size",     # int: the member's data size in bytes
        "ext",      # the image member's suffix, lower case, one of IMAGE_EXTS (name = key + "." + ext)
        "json",     # [offset, size] of the key's .json member; absent when the sample has none
    ),
    "folder": (
        "file",     # image path relative to the shard folder, '/'-separated ("sub/b.c.jpg")
        "size",     # int: the file's size in bytes at index time
        "ext",      # the image file's suffix, lower case
        "json",     # path of the sibling .json file relative to the shard folder; absent when none
    ),
}
MANIFEST_FILE = "manifest.json"
TRAINED_INDEX_FILE = f"{FAISS_DIR}/trained.index"

INDEX_MANIFEST_KEYS = (
    "num_images",      # images read successfully
    "num_vectors",     # rows (crops) embedded
    "skipped",         # {reason: count} of unreadable gallery entries
    "encoders",        # [EncoderSpec.to_dict()]
    "index_factory",   # faiss factory string actually used
    "shards",          # [{"name", "offset", "num_vectors", "num_images", "fingerprint"}]
    "groups",          # [{"file", "shards": [names], "factory", "num_vectors"}]
    "shared_quantizer",  # true: every group was filled from trained_index (one coarse quantizer and
                       # PQ codebooks); false (or absent, older indexes): each group trained its own
    "trained_index",   # {"file", "fingerprint", "num_train", "factory"} or null
    "config",          # the resolved indexing config
    "code_version",
)


def encoder_slug(name: str) -> str:
    """File-system safe name of an encoder, e.g. 'ViT-B-32.openai' -> 'ViT-B-32.openai'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def embedding_file(encoder_name: str) -> str:
    return f"{encoder_slug(encoder_name)}.npy"


# ---------------------------------------------------------------- curated directory

TRANSFER_PATTERN = "transfer-%06d.tar"
QUERIES_PATTERN = "queries-%06d.tar"
QUERIES_DRAW_FILE = "queries.json"
REPORT_FILE = "report.html"
STAGES_DIR = ".curate"
REPORT_THUMBS_FILE = f"{STAGES_DIR}/report-thumbs.tar"   # relative to DIR; written by the write stage


@dataclass(frozen=True)
class QueryHit:
    query: str         # query image id
    similarity: float  # combined (mean cosine) similarity
    rank: int          # 0-based rank of this item in the query's neighbour list


@dataclass(frozen=True)
class TransferRecord:
    """The ``<key>.json`` of a curated transfer sample."""
    key: str
    source_id: str                 # gallery image id
    crop: int                      # crop index within the source image
    recipe: dict[str, Any]         # CropRecipe.to_dict()
    queries: list[QueryHit] = field(default_factory=list)
    similarity: float = 0.0        # best similarity over the queries that retrieved it
    rank: int = 0                  # position in the curated order

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "source_id": self.source_id, "crop": self.crop, "recipe": self.recipe,
            "queries": [q.__dict__ for q in self.queries],
            "similarity": self.similarity, "rank": self.rank,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransferRecord":
        return cls(key=d["key"], source_id=d["source_id"], crop=d["crop"], recipe=d["recipe"],
                   queries=[QueryHit(**q) for q in d.get("queries", [])],
                   similarity=d.get("similarity", 0.0), rank=d.get("rank", 0))


def transfer_key(source_id: str, crop: int) -> str:
    """WebDataset keys may not contain dots (they split extensions); '/' is kept out too."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", source_id) + f"_c{crop:03d}"
