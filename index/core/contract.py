"""The data contract between stages, in one place: file layouts, record fields and id formats.

Gallery -> (index/) embedding shards + FAISS index -> (curation/) curated WebDataset shards ->
(distill/) runs. Every stage reads and writes only what is named here.

Gallery
    WebDataset tars as img2dataset writes them (``key.jpg|png|webp``, ``key.json``, optional
    ``key.txt``) or an image folder. Image id: ``"<shard>/<key>"`` where ``shard`` is the tar's file
    stem (``00003`` for ``00003.tar``) and ``key`` the sample's ``__key__``.

Index directory (``build-index --out DIR``)
    DIR/vectors/<encoder-slug>/<shard>.npy      float16 [n, dim] L2-normalised: one folder per encoder
                                                holding nothing but these matrices, one per gallery
                                                shard, so a reader of .npy folders (clip-retrieval's
                                                embedding-reader) reads an encoder's matrices as they
                                                are (STORE_FORMAT 4; earlier formats kept them at
                                                DIR/embeddings/<shard>/<encoder-slug>.npy)
    DIR/embeddings/<shard>/rows.jsonl           one line per row: {"id", "crop", "recipe", "loc", "hash"}
                                                (ROW_FIELDS; "loc" is absent in indexes built before
                                                locations were recorded, STORE_FORMAT 1, "hash" in
                                                those built before content hashes, STORE_FORMAT <= 2)
    DIR/embeddings/<shard>/rows.offsets.npy     int64 [n + 1]: byte offset of each rows.jsonl line,
                                                then the file size, so row r is bytes
                                                [off[r], off[r + 1]) (absent in STORE_FORMAT 1 indexes)
    DIR/embeddings/<shard>/done.json            written last, after the shard's matrices and row
                                                table: counts, fingerprint (over the config,
                                                STORE_FORMAT and "input", the digest of every byte of
                                                the gallery shard: index.gallery.shard_digest),
                                                encoders, "store_format" ("rows_format" before 4), ...
    DIR/faiss/trained.index                     the trained, empty index every group is filled from
                                                (IVF factories; manifest "shared_quantizer": true)
    DIR/faiss/trained.index.done.json           written last: fingerprint of shards + factory + seed
    DIR/faiss/group-<g>.index                   FAISS index over the combined vectors of a shard group
                                                (a plain faiss file: faiss.read_index reads it)
    DIR/faiss/operating_points.json             IVF indexes: {"sample", "points"}: recall@10/100/1000
                                                and seconds per query for each (nprobe, rerank)
                                                measured (index.recall), with its .done.json record
    DIR/manifest.json                           written last: see INDEX_MANIFEST_KEYS
    Row ids in the FAISS indexes are global: shard offset (from the manifest) + row in shard.

Curated directory (``curate --out DIR``)
    DIR/transfer-000000.tar ...   samples: ``<key>.jpg`` (crop, 224 px), ``<key>.json`` (TransferRecord)
    DIR/queries-000000.tar ...    samples: ``<key>.png`` (query image), ``<key>.cls`` (label int),
                                  ``<key>.json`` (QUERY_SAMPLE_FIELDS)
    Every sample of a kind has the same members and its JSON the same keys, each always of one JSON
    type (no key left out, no list mixing types; CURATED_FORMAT), so Arrow-based readers (Hugging
    Face datasets) type them; wids reads them by the manifest's "shardlist".
    DIR/queries.json              the draw: query set name, seed, classes, [{id, label}]
    DIR/manifest.json             written last: counts, thresholds, ..., "shards" (the transfer tars),
                                  "shardlist": {"transfer": [{"url", "nsamples"}], "queries": [...]}
                                  (urls relative to DIR), "format" (CURATED_FORMAT); DIR/report.html
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
from collections.abc import Mapping
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

EMBEDDINGS_DIR = "embeddings"   # per shard: its row table, line offsets and done record
VECTORS_DIR = "vectors"         # per encoder: its matrices, one per shard
FAISS_DIR = "faiss"
ROWS_FILE = "rows.jsonl"
ROWS_OFFSETS_FILE = "rows.offsets.npy"
DONE_FILE = "done.json"

# The embedding store's format. 1: rows {"id", "crop", "recipe"}; 2: + "loc" and the line-offset
# table; 3: + "hash"; 4: the matrices in one folder per encoder (vectors_file), apart from the row
# tables, and recipe ops as {"op", "magnitude"} objects (recipe_json). Part of every embedding
# shard's fingerprint, and a rerun names a shard written in another format (index.embed), so it is
# refused, never silently reused; indexes of older formats are still read (their matrices at
# legacy_vectors_file; without "hash": changed images go unnoticed, with a warning).
STORE_FORMAT = 4

ROW_FIELDS = (
    "id",       # gallery image id "<shard>/<key>"
    "crop",     # crop index within the image
    "recipe",   # CropRecipe.to_dict(): recipe_json's form ([name, magnitude] ops before STORE_FORMAT 4)
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
OPERATING_POINTS_FILE = f"{FAISS_DIR}/operating_points.json"

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
    "nprobe",          # IVF lists probed by default (the operating point's)
    "rerank",          # candidates re-scored exactly per result by default (0: none)
    "recall",          # the measured operating points: OPERATING_POINTS_FILE's content, or null
    "operating_point", # {"nprobe", "rerank", "k", "recall", "seconds_per_query", "target", "why"}
    "config",          # the resolved indexing config
    "store_format",    # STORE_FORMAT of its embedding shards (absent in indexes built before 4)
    "code_version",
)


def encoder_slug(name: str) -> str:
    """File-system safe name of an encoder, e.g. 'ViT-B-32.openai' -> 'ViT-B-32.openai'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def vectors_dir(encoder_name: str) -> str:
    """DIR-relative folder of one encoder's matrices: nothing but ``<shard>.npy`` files in it."""
    return f"{VECTORS_DIR}/{encoder_slug(encoder_name)}"


def vectors_file(encoder_name: str, shard: str) -> str:
    """DIR-relative path of one shard's float16 [n, dim] matrix of one encoder."""
    return f"{vectors_dir(encoder_name)}/{shard}.npy"


def legacy_vectors_file(encoder_name: str, shard: str) -> str:
    """Where indexes of STORE_FORMAT <= 3 keep that matrix: beside the shard's row table."""
    return f"{EMBEDDINGS_DIR}/{shard}/{encoder_slug(encoder_name)}.npy"


# ---------------------------------------------------------------- crop recipes

RECIPE_FIELDS = (
    "box",      # [top, left, height, width] in source pixels, 4 ints
    "size",     # int: output side in pixels
    "full",     # bool: the whole image (keep_full_image's crop 0), no ops
    "ops",      # [{"op": RandAugment op name, "magnitude": float}] in the order applied, never empty:
                # a recipe without ops (the full image; randaugment off) lists NO_OP, the op space's
                # own no-op. Hugging Face datasets types a JSON column from the first five samples of
                # a shard and fails on a list that is empty in all five but not later (its issue
                # #7549), and a set's first crops are often full images.
)
NO_OP = {"op": "Identity", "magnitude": 0.0}


def recipe_json(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A crop recipe in its written form: RECIPE_FIELDS, each of one JSON type, ops as objects (NO_OP
    where it has none).

    Reads either form of the ops: objects, or the [name, magnitude] pairs of rows written before
    STORE_FORMAT 4 and of transfer records before CURATED_FORMAT 2 (a list mixing a string and a
    number, which Arrow cannot type). Malformed input raises ValueError saying what is wrong."""
    if not isinstance(recipe, Mapping):
        raise ValueError(f"a crop recipe is a JSON object with {list(RECIPE_FIELDS)}; got {recipe!r}")
    missing = [k for k in ("box", "size") if k not in recipe]
    box = recipe.get("box")
    if missing or not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"a crop recipe needs 'box' [top, left, height, width] and 'size'; got {dict(recipe)!r}")
    ops = []
    for op in recipe.get("ops") or ():
        if isinstance(op, Mapping) and set(op) == {"op", "magnitude"}:
            name, magnitude = op["op"], op["magnitude"]
        elif isinstance(op, (list, tuple)) and len(op) == 2:
            name, magnitude = op
        else:
            raise ValueError(f"a recipe op is {{'op': name, 'magnitude': number}}; got {op!r}")
        if not isinstance(name, str) or isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)):
            raise ValueError(f"a recipe op has a string 'op' and a number 'magnitude'; got {op!r}")
        ops.append({"op": name, "magnitude": float(magnitude)})
    return {"box": [int(x) for x in box], "size": int(recipe["size"]), "full": bool(recipe.get("full", False)),
            "ops": ops or [dict(NO_OP)]}


# ---------------------------------------------------------------- curated directory

TRANSFER_PATTERN = "transfer-%06d.tar"
QUERIES_PATTERN = "queries-%06d.tar"
QUERIES_DRAW_FILE = "queries.json"
REPORT_FILE = "report.html"
STAGES_DIR = ".curate"
REPORT_THUMBS_FILE = f"{STAGES_DIR}/report-thumbs.tar"   # relative to DIR; written by the write stage

# The curated set's format. 1: recipe ops as [name, magnitude] pairs; 2: every sample JSON of one
# Arrow type (recipe_json's ops objects, numbers of one JSON type per key) and the manifest's
# "shardlist". Part of the write stage's fingerprint, so a rerun over a set of an older format
# rewrites its shards; transfer records of format 1 are still read (TransferRecord.from_dict).
CURATED_FORMAT = 2

TRANSFER_SAMPLE_FIELDS = ("jpg", "json")          # members of every transfer sample (+ __key__)
QUERY_SAMPLE_FIELDS = ("png", "cls", "json")      # members of every query sample (+ __key__)
QUERY_JSON_FIELDS = (
    "id",          # the query image's id in its query set
    "label",       # int, index into queries.json "classes" (equal to the .cls member)
    "class_name",  # queries.json "classes"[label]
)


@dataclass(frozen=True)
class QueryHit:
    query: str         # query image id
    similarity: float  # combined (mean cosine) similarity
    rank: int          # 0-based rank of this item in the query's neighbour list


@dataclass(frozen=True)
class TransferRecord:
    """The ``<key>.json`` of a curated transfer sample: ``to_dict`` writes every field, each of one
    JSON type (the recipe in `recipe_json`'s form), so every sample's JSON has one Arrow type."""
    key: str
    source_id: str                 # gallery image id
    crop: int                      # crop index within the source image
    recipe: dict[str, Any]         # CropRecipe.to_dict()
    queries: list[QueryHit] = field(default_factory=list)
    similarity: float = 0.0        # best similarity over the queries that retrieved it
    rank: int = 0                  # position in the curated order

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "source_id": self.source_id, "crop": int(self.crop),
            "recipe": recipe_json(self.recipe),
            "queries": [{"query": q.query, "similarity": float(q.similarity), "rank": int(q.rank)}
                        for q in self.queries],
            "similarity": float(self.similarity), "rank": int(self.rank),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransferRecord":
        """Reads records of every CURATED_FORMAT (format 1's recipe ops are pairs: `recipe_json` reads both)."""
        return cls(key=d["key"], source_id=d["source_id"], crop=d["crop"], recipe=d["recipe"],
                   queries=[QueryHit(**q) for q in d.get("queries", [])],
                   similarity=d.get("similarity", 0.0), rank=d.get("rank", 0))


TRANSFER_JSON_FIELDS = tuple(TransferRecord.__dataclass_fields__)   # the keys of every transfer JSON


def transfer_key(source_id: str, crop: int) -> str:
    """WebDataset keys may not contain dots (they split extensions); '/' is kept out too."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", source_id) + f"_c{crop:03d}"
