"""Scale benchmark: does curate's cost follow the work (N) or the gallery? Prints one JSON object.

Two parts, measured side by side in one run:

- ``io``: galleries of real small images (Fashion-MNIST train images, Tux Paint stamps and
  scikit-image photos cut into random crops, whichever are installed; the tests' pattern images
  otherwise) written as many WebDataset tar shards, of growing size, each indexed with a small fast
  encoder, then ``curate`` of N items with a class-folder query set written here (Fashion-MNIST test
  images, or pattern classes). Each curate runs in a fresh subprocess, so sizes do not mix: wall
  time by stage (the manifest's ``timings``), driver peak RSS (VmHWM), gallery bytes read
  (the manifest's ``timings.gallery_reads``: range reads by the driver and its workers; an open()
  wrapper and /proc/self/io beside it as cross-checks), the bytes of the distinct images curate
  embedded the originals of (candidates, removed ones included) and of those the written set comes
  from, and pairs verified per second. ``--executor ray`` runs curate's tasks on two Ray actors and
  reports their peak RSS; local runs them in the driver (worker RSS null, with the reason).
- ``search``: synthetic clustered unit vectors (bench/search_groups.py's mixture and float16
  embedding shards), IVF-PQ (4-bit codes) built by ``index.build.build_faiss_groups`` with one
  shared quantizer, searched through ``GalleryIndex(root, executor=LocalExecutor())`` in a fresh
  process (it opens only the trained quantizer; tasks map their groups): per size, search time at a
  fixed nprobe, driver peak RSS, recall@50 against exact search; at the largest size 10 vs 100
  groups with the shared quantizer and, for contrast, with a quantizer per group.

The top-level ``targets`` hold, each as {"value", "goal", "met"}: bytes_read_ratio (bytes read over
the candidates' bytes; the ratio over the written set's bytes is in each row), driver_rss_growth
(curate, largest over smallest gallery), driver_rss_growth_search (search, largest over smallest
vector count), non_search_time_growth, search_groups_ratio (shared quantizer, 100 over 10 groups),
verify_pairs_per_s. Every figure is measured in this run; wall times on a machine shared with other
work say so in ``machine``.

    python bench/scale.py --smoke    # seconds: a run check (tiny sizes, temp dir); its figures mean nothing
    python bench/scale.py --quick    # < 10 min on 2 cores: 1k/2k images (tiny encoder), 10^5/10^6 vectors
    python bench/scale.py            # about 15-20 min on a quiet 2-core machine (estimated, not yet timed)

Full covers: galleries of 2k/8k/20k images (efficientnet_lite0 at 64 px, 3 crops each) at N = 1,000,
and 10^5/10^6/2x10^6 vectors x 64 (the largest also built three more ways: 100 shared-quantizer groups
and 10/100 per-group-quantizer groups). It does not cover the design's 10^7 vectors or 100k-image
galleries, nor N = 10^4 (each would take well over the 20 minutes on 2 cores), nor GPU verification;
growth figures are over the sizes it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "tests")) if p not in sys.path]  # tests/: shared helpers

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from index.core.allocator import tune_allocator  # noqa: E402
from index.core.images import load_image_file  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    "smoke": dict(images=[40, 80], sizes_n=[10], per_shard=10, search_sizes=[4_000, 8_000], groups=(2, 4),
                  dim=16, pq=4, queries=10, nprobe=4),
    "quick": dict(images=[1_000, 2_000], sizes_n=[1_000], per_shard=100, search_sizes=[100_000, 1_000_000],
                  groups=(10, 100), dim=64, pq=16, queries=100, nprobe=16),
    "full": dict(images=[2_000, 8_000, 20_000], sizes_n=[1_000], per_shard=100,
                 search_sizes=[100_000, 1_000_000, 2_000_000], groups=(10, 100), dim=64, pq=16, queries=100,
                 nprobe=16),
}
ENCODER, IMAGE_SIZE, CROP_SIZE, CROPS_PER_IMAGE = "efficientnet_lite0", 64, 64, 2
# --smoke and --quick index with the tiny random-init encoder: its similarities are not a real model's
# (fewer or more copy candidates), but it indexes ~10x faster, which --quick's 10 minutes need
TINY_ENCODER = "test-tiny-timm"
# fixed copy thresholds (the paper's, verification on): no calibration, so every size runs the same
# decision and the stage times compare; a calibrated run adds a size-independent calibration stage
THRESHOLDS = dict(dedup_threshold=0.99, leak_threshold=0.95, verify="align", verify_threshold=0.9,
                  verify_max_residual="inf", key_threshold=1.0)
STAMPS = Path("/usr/share/tuxpaint/stamps")
RECALL_K = 50
# 4-bit PQ codes (faiss "PQ{m}x4"): training 8-bit codebooks (256 centroids per sub-quantizer) took
# ~30 s per group of 10^4 vectors on the 2-core machine, 4-bit ~0.5 s, and the groups comparison
# trains 110 groups; the index type, build and search code path are the same
PQ_BITS = 4


# ------------------------------------------------------------------ real small images

def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


# gallery images at web sizes: img2dataset galleries hold 256-512 px JPEGs of tens of KB, against
# which a sample's tar headers and json (about 1.5 KB a sample) are small; 28 px PNGs of a few
# hundred bytes would measure the tar format's overhead instead of curate's reads
WEB_SIDE = 224


def _web(im: Image.Image) -> Image.Image:
    return im.convert("RGB").resize((WEB_SIDE, WEB_SIDE), Image.BICUBIC)


def _crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    s = rng.uniform(0.2, 0.8)
    cw, ch = max(8, int(w * np.sqrt(s))), max(8, int(h * np.sqrt(s)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    side = int(rng.integers(128, 385))
    scale = side / max(cw, ch)
    return im.crop((x, y, x + cw, y + ch)).resize((max(8, int(cw * scale)), max(8, int(ch * scale))))


def _photos(stamps: int) -> list[Image.Image]:
    """`stamps` Tux Paint stamps (flattened on white, <= 256 px) and scikit-image's bundled photos."""
    from fixtures_samples import SKIMAGE_PHOTOS, bundled_skimage

    out = []
    pngs = sorted(STAMPS.rglob("*.png")) if STAMPS.is_dir() else []
    for p in pngs[::max(1, len(pngs) // max(1, stamps))][:stamps]:
        im = load_image_file(str(p))
        im.thumbnail((256, 256))
        out.append(im)
    for name in SKIMAGE_PHOTOS:
        arr = bundled_skimage(name)
        if arr is not None:
            if arr.dtype == bool:
                arr = arr.astype(np.uint8) * 255
            elif arr.dtype != np.uint8:
                arr = (255 * (arr - arr.min()) / max(1e-9, float(arr.max() - arr.min()))).astype(np.uint8)
            out.append(Image.fromarray(arr).convert("RGB"))
    return out


def _fashion(split: str):
    from curation.datasets import DatasetNotFoundError, load_fashion_mnist
    try:
        return load_fashion_mnist(split)
    except (DatasetNotFoundError, FileNotFoundError):
        return None


def gallery_samples(n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """n (ext, image bytes): 60% Fashion-MNIST train images (upscaled to WEB_SIDE, JPEG), 40% JPEG
    random crops of the photos (128-384 px); the tests' pattern images where neither is installed."""
    rng = np.random.default_rng(seed)
    fm, photos = _fashion("train"), _photos(min(400, max(10, n // 20)))
    if fm is None and not photos:
        from fixtures_gallery import pattern
        for i in range(n):
            yield "png", _png(pattern(seed * 10_000_000 + i, size=int(rng.integers(32, 97))))
        return
    order = rng.permutation(len(fm[0])) if fm is not None else None
    for i in range(n):
        if fm is not None and (not photos or rng.random() < 0.6):
            yield "jpg", _jpeg(_web(Image.fromarray(fm[0][order[i % len(order)]])))
        else:
            yield "jpg", _jpeg(_crop(photos[int(rng.integers(len(photos)))], rng))


def write_gallery(root: Path, n: int, per_shard: int, seed: int = 0) -> dict[str, int]:
    """WebDataset tar shards (webdataset.TarWriter) under root; returns {image id: image member bytes}."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    writer, shard = None, -1
    for i, (ext, data) in enumerate(gallery_samples(n, seed)):
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            shard += 1
            writer = wds.TarWriter(str(root / f"{shard:05d}.tar"))
        key = f"{i:08d}"
        writer.write({"__key__": key, ext: data, "json": {"key": key}})
        sizes[f"{shard:05d}/{key}"] = len(data)
    if writer is not None:
        writer.close()
    return sizes


def write_task(root: Path, per_class: int, seed: int = 0) -> tuple[Path, int]:
    """A class-per-folder task (Fashion-MNIST test images, or pattern classes); (folder, classes)."""
    fm = _fashion("test")
    if fm is None:
        from fixtures_gallery import CLASSES, class_member
        for c, name in enumerate(CLASSES):
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                class_member(c, 1000 + 100 * c + i).save(root / name / f"{i:03d}.png")
        return root, len(CLASSES)
    x, y = fm
    rng = np.random.default_rng(seed)
    for c in range(10):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(rng.choice(np.flatnonzero(y == c), size=per_class, replace=False)):
            _web(Image.fromarray(x[i])).save(root / f"class_{c}" / f"{j:03d}.png")
    return root, 10


def build_gallery_index_quiet(gallery: Path, out: Path, encoder: str, per_group: int) -> dict:
    from index.build import build_gallery_index
    from index.config import FaissConfig, IndexConfig
    from index.crops import CropConfig

    cfg = IndexConfig(gallery=str(gallery / "*.tar"), encoders=(encoder,),
                      image_size=IMAGE_SIZE if encoder == ENCODER else None,
                      crops=CropConfig(crops_per_image=CROPS_PER_IMAGE, size=CROP_SIZE, keep_full_image=True),
                      faiss=FaissConfig(shards_per_group=per_group), batch_size=64)
    with contextlib.redirect_stdout(sys.stderr):
        return build_gallery_index(cfg, out)


# ------------------------------------------------------------------ measurements inside a child process

def proc_io() -> dict[str, int]:
    """This process's /proc/self/io counters (rchar: bytes through read(); read_bytes: from storage)."""
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}
    except OSError:
        return {}


class GalleryReads:
    """Counts the bytes read from files under the gallery root, at the OS level (what a read of the
    file returns to the process, buffer fills included), and every path the process opens.

    Python's `open` (also `io.open` and tarfile's own reference to it) is wrapped for the child
    process's lifetime: a binary read-only open of a gallery file gets a counting `io.FileIO` under
    the usual buffered reader; every other open is passed through unchanged. An audit hook records the
    paths opened, so the gallery files touched are listed too."""

    def __init__(self, gallery: Path):
        import builtins
        import tarfile as tarmod

        self.root = os.path.abspath(gallery) + os.sep
        self.bytes = 0
        self.paths: set[str] = set()
        self.on = False
        counter = self

        class CountingFileIO(io.FileIO):
            def readinto(self, b):
                n = super().readinto(b)
                if n and counter.on:
                    counter.bytes += n
                return n

            def read(self, size=-1):
                data = super().read(size)
                if data and counter.on:
                    counter.bytes += len(data)
                return data

            def readall(self):
                data = super().readall()
                if data and counter.on:
                    counter.bytes += len(data)
                return data

        real_open = builtins.open

        def counting_open(file, mode="r", buffering=-1, *args, **kwargs):
            if (isinstance(file, (str, os.PathLike)) and mode in ("rb", "br") and not args and not kwargs
                    and os.path.abspath(os.fspath(file)).startswith(self.root)):
                raw = CountingFileIO(file, "rb")
                return raw if buffering == 0 else io.BufferedReader(
                    raw, buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE)
            return real_open(file, mode, buffering, *args, **kwargs)

        builtins.open = io.open = tarmod.bltn_open = counting_open
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args) -> None:
        if self.on and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.add(os.path.abspath(os.fsdecode(args[0])))


def _agree(a: int | None, b: int | None, tol: float = 0.10) -> bool | None:
    return None if a is None or b is None or not b else abs(a - b) / b <= tol


def gallery_bytes_read(ranged: dict[str, int], reads: GalleryReads, io_delta: dict[str, int],
                       executor: str) -> dict[str, Any]:
    """Bytes curate read from gallery files.

    ``bytes`` is the manifest's ``timings.gallery_reads`` (`index.ranged.ReadStats`: every range
    read of a gallery file by the driver and, merged from their task results, its workers). Beside it,
    as cross-checks of the driver process only: `GalleryReads`' count (Python ``open()`` of gallery
    files wrapped with a byte counter: a buffered reader fills whole 8 KiB buffers, so for small
    members it counts more than the range reads asked for) and the process's /proc/self/io deltas
    (every file: index, models and libraries too, so an upper bound). ``*_agrees`` is whether a
    cross-check is within 10% of ``bytes``; with workers in other processes (Ray) neither cross-check
    sees their reads.
    """
    opened = sorted(p for p in reads.paths if p.startswith(reads.root) and os.path.isfile(p))
    primary = ranged.get("bytes")
    rchar = io_delta.get("rchar")
    return {"bytes": primary, "method": "index.ranged.ReadStats of the driver and its workers (manifest "
                                        "timings.gallery_reads)",
            "ranged": ranged, "executor": executor,
            "open_wrapper_bytes": reads.bytes, "open_wrapper_agrees": _agree(reads.bytes, primary),
            "process_rchar_delta": rchar, "process_rchar_agrees": _agree(rchar, primary),
            "process_read_bytes_delta": io_delta.get("read_bytes"),
            "cross_checks_cover": "driver process only" if executor != "local" else "every read (one process)",
            "gallery_files_opened": len(opened),
            "gallery_files_opened_bytes": sum(os.path.getsize(p) for p in opened)}


def _vmhwm_kb(pid: int) -> int | None:
    """Peak resident set of a process (/proc/<pid>/status VmHWM, KiB). Unlike ``ru_maxrss``, which
    Linux carries across fork and exec (a child starts with its parent's peak at the fork), this is
    the peak of the process's own address space."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class WorkerPeaks(threading.Thread):
    """Polls this process's descendant Ray worker processes (process title ``ray::...``) for their
    peak RSS (/proc/<pid>/status VmHWM) every `interval` s. The executor kills its actors after each
    map, so their peaks are read while they live; a peak reached in the last `interval` before an
    actor ends can be missed (the polled figure is a lower bound)."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.peaks_kb = interval, {}
        self.halt = threading.Event()

    @staticmethod
    def _descendants(root: int) -> list[int]:
        kids: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:   # "pid (comm) state ppid ..."; comm may hold spaces
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                kids.setdefault(ppid, []).append(int(d))
        out, todo = [], [root]
        while todo:
            for c in kids.get(todo.pop(), []):
                out.append(c)
                todo.append(c)
        return out

    def run(self) -> None:
        while not self.halt.is_set():
            for pid in self._descendants(os.getpid()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        title = f.read().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                if title.startswith("ray::") and "IDLE" not in title:
                    hwm = _vmhwm_kb(pid)
                    if hwm:
                        self.peaks_kb[pid] = max(self.peaks_kb.get(pid, 0), hwm)
            self.halt.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self.halt.set()
        self.join()
        mb = sorted((round(v / 1024, 1) for v in self.peaks_kb.values()), reverse=True)
        return {"worker_peak_rss_mb": mb[0] if mb else None, "worker_peaks_mb": mb,
                "method": f"VmHWM of ray:: worker processes, polled every {self.interval} s (a lower bound)"}


def child_curate(spec: dict[str, Any]) -> dict[str, Any]:
    """One curate in this (fresh) process: manifest figures, peak RSS, bytes read."""
    import torch

    torch.set_num_threads(spec["threads"])
    from curation.pipeline import CurateConfig, curate

    executor, peaks = None, None
    if spec["executor"] == "ray":
        from jobs.executors import make_executor
        executor, peaks = make_executor("ray", num_workers=2), WorkerPeaks()
    reads = GalleryReads(Path(spec["gallery"]))
    cfg = CurateConfig(queries=spec["queries"], index=spec["index"], size=spec["n"], out=spec["out"],
                       cache_dir=spec["cache"], executor=spec["executor"], **THRESHOLDS)
    rss_before = _vmhwm_kb(os.getpid())
    io0 = proc_io()
    reads.on = True
    if peaks is not None:
        peaks.start()
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        manifest = curate(cfg, executor)
    wall = time.perf_counter() - t
    workers = peaks.stop() if peaks is not None else {
        "worker_peak_rss_mb": None, "reason": "executor local: curate's tasks run in the driver process"}
    reads.on = False
    io1 = proc_io()
    delta = {k: io1[k] - io0[k] for k in io1 if k in io0}
    return {"wall_s": round(wall, 3), "timings": manifest["timings"], "verified_pairs": manifest["verified_pairs"],
            "counts": manifest["counts"],
            "driver_peak_rss_mb": round(_vmhwm_kb(os.getpid()) / 1024, 1),
            "driver_rss_before_curate_mb": round(rss_before / 1024, 1), "workers": workers,
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "gallery_read": gallery_bytes_read(manifest["timings"].get("gallery_reads", {}), reads, delta,
                                               spec["executor"])}


def child_search(spec: dict[str, Any]) -> dict[str, Any]:
    """Search an index dir through `GalleryIndex` with a `LocalExecutor` at a fixed nprobe: this
    process opens the trained quantizer, the tasks (run here, one at a time) open their groups
    memory-mapped, `search_task_bytes` of index files each. Recall@50 against the exact ids given."""
    import faiss

    from index.core.executor import LocalExecutor
    from index.gallery_index import GalleryIndex

    faiss.omp_set_num_threads(spec["threads"])
    queries, exact = np.load(spec["queries"]), np.load(spec["exact"])
    rss0 = _vmhwm_kb(os.getpid())
    gi = GalleryIndex(spec["index"], executor=LocalExecutor())
    t = time.perf_counter()
    gi.search(queries[:2], RECALL_K, spec["nprobe"])   # warm-up: opens the quantizer, maps every group once
    first_s = time.perf_counter() - t
    faiss.cvar.indexIVF_stats.reset()
    t = time.perf_counter()
    _, ids = gi.search(queries, RECALL_K, spec["nprobe"])
    search_s = time.perf_counter() - t
    scanned = faiss.cvar.indexIVF_stats.ndis / len(queries)
    rss = _vmhwm_kb(os.getpid())
    hit = np.mean([len(set(a[a >= 0].tolist()) & set(b.tolist())) / RECALL_K for a, b in zip(ids, exact)])
    return {"first_search_s": round(first_s, 3), "search_s": round(search_s, 4),
            "driver_peak_rss_mb": round(rss / 1024, 1), "driver_rss_before_open_mb": round(rss0 / 1024, 1),
            "vectors_scanned_per_query": round(scanned, 1), "recall_at_50": round(float(hit), 4),
            "search_task_bytes": gi.search_task_bytes}


def run_child(kind: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), f"--child-{kind}",
                           json.dumps({**spec, "threads": threads})],
                          capture_output=True, text=True, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ I/O part

def needed_bytes(out: Path, member_sizes: dict[str, int]) -> tuple[int, int]:
    """(bytes, images): member sizes of the distinct gallery images the curated set's items come from."""
    src = set()
    for shard in sorted(out.glob("transfer-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    src.add(json.load(tf.extractfile(m))["source_id"])
    return sum(member_sizes[s] for s in src), len(src)


def candidate_images(out: Path, index: Path) -> set[str]:
    """The distinct gallery images curate read the originals of (stage ``filter``'s record lists them)."""
    from curation.run.records import StageStore
    from index.core.atomic import read_json

    return set(read_json(StageStore(out).json_path("filter"))["data"]["originals"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def io_part(work: Path, mode: dict[str, Any], encoder: str, threads: int, log, executor: str = "local"
            ) -> dict[str, Any]:
    from index.core import contract

    small = mode["sizes_n"][0] < 100
    task, classes = write_task(work / "task", per_class=6 if small else 10)
    queries = f"folder:{task}:{3 if small else 5}shot"
    rows = []
    for n_img in mode["images"]:
        t = time.perf_counter()
        gal = work / f"gallery-{n_img}"
        sizes = write_gallery(gal, n_img, mode["per_shard"])
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        idx = work / f"index-{n_img}"
        man = build_gallery_index_quiet(gal, idx, encoder, per_group=16)
        t_index = time.perf_counter() - t
        log(f"scale io: {n_img} images, {len(man['shards'])} shards, {man['num_vectors']} vectors "
            f"[{man['index_factory']}] (write {t_write:.0f} s, index {t_index:.0f} s)")
        for n in mode["sizes_n"]:
            # a fresh reference-feature cache per run: every run pays the same (gallery-independent) setup
            out = work / f"curated-{n_img}-n{n}"
            r = run_child("curate", {"queries": queries, "index": str(idx), "n": n, "out": str(out),
                                     "cache": str(work / f"cache-{n_img}-n{n}"), "gallery": str(gal),
                                     "executor": executor}, threads)
            need, need_imgs = needed_bytes(out, sizes)
            cands = candidate_images(out, idx)
            looked = sum(sizes[i] for i in cands)
            read = r["gallery_read"]["bytes"]
            tm = r["timings"]
            verify_s = tm.get("verify", 0.0)
            rows.append({
                "gallery_images": n_img, "gallery_shards": len(man["shards"]), "gallery_vectors": man["num_vectors"],
                "gallery_bytes": sum(os.path.getsize(p) for p in gal.glob("*.tar")),
                "index_factory": man["index_factory"], "index_groups": len(man["groups"]), "n": n,
                "written": r["counts"]["written"], "wall_s": r["wall_s"], "timings_s": tm,
                "non_search_s": round(r["wall_s"] - tm.get("search", 0.0), 3),
                "driver_peak_rss_mb": r["driver_peak_rss_mb"],
                "driver_rss_before_curate_mb": r["driver_rss_before_curate_mb"],
                "worker_peak_rss_mb": r["workers"]["worker_peak_rss_mb"], "workers": r["workers"],
                "gallery_read": r["gallery_read"],
                "needed_bytes": need, "needed_images": need_imgs,
                "needed_definition": "member bytes of the written set's distinct source images",
                "candidate_bytes": looked, "candidate_images": len(cands),
                "candidate_definition": "member bytes of every distinct image curate embedded the original of "
                                        "(the filter stage's record)",
                "bytes_read_ratio": _ratio(read, looked),
                "bytes_read_ratio_definition": "gallery bytes read / candidate_bytes",
                "bytes_read_over_needed_ratio": _ratio(read, need),
                "bytes_read_over_needed_definition": "gallery bytes read / needed_bytes",
                "verified_pairs": r["verified_pairs"],
                "verify_pairs_per_s": round(r["verified_pairs"] / verify_s, 1) if verify_s > 0 else None,
                "index_build_s": round(t_index, 1)})
            log(f"scale io: N={n} from {n_img} images: {r['wall_s']:.1f} s, rss {r['driver_peak_rss_mb']} MB, "
                f"read {read} B for {looked} B looked at ({need} B written), {r['verified_pairs']} pairs")
            shutil.rmtree(out, ignore_errors=True)
        for name in (contract.EMBEDDINGS_DIR, contract.VECTORS_DIR):
            shutil.rmtree(idx / name, ignore_errors=True)
    return {"encoder": encoder, "image_size": IMAGE_SIZE if encoder == ENCODER else None,
            "crops_per_image": CROPS_PER_IMAGE, "crop_size": CROP_SIZE, "queries": queries, "classes": classes,
            "thresholds": THRESHOLDS, "executor": executor, "sizes": rows}


# ------------------------------------------------------------------ search part

def _search_groups():
    """bench/search_groups.py as a module (this folder is kept off the import path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_search_groups", Path(__file__).resolve().with_name(
        "search_groups.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def search_part(work: Path, mode: dict[str, Any], threads: int, log) -> dict[str, Any]:
    """Per size: one shared quantizer over `few` groups; at the largest size also `many` groups with
    it, and both group counts with a quantizer per group (the old build) for contrast. Indexes are
    built in this process by `index.build.build_faiss_groups` (bench/search_groups.py's `index_dir`)
    and searched in a fresh subprocess (`child_search`)."""
    from index import knn, store
    from index.search import exact_search

    sg = _search_groups()
    dim, few, many, pq, nprobe = mode["dim"], *mode["groups"], mode["pq"], mode["nprobe"]
    if many % few:
        raise ValueError(f"group counts must divide: {few}, {many}")
    rows, by = [], {}
    largest = max(mode["search_sizes"])
    for n in mode["search_sizes"]:
        root = work / f"vectors-{n}"
        t = time.perf_counter()
        x = sg.mixture(n, dim, seed=1)
        q = sg.mixture(mode["queries"], dim, seed=2)
        entries = sg.write_embeddings(root / "embeddings", x, many)
        del x
        exact = exact_search(q, store.iter_blocks(root / "embeddings", entries, [sg.ENCODER]), RECALL_K)[1]
        qpath, epath = root / "queries.npy", root / "exact.npy"
        np.save(qpath, q)
        np.save(epath, exact)
        t_data = time.perf_counter() - t
        trained_src = None
        builds = [("shared", few)] + ([("shared", many), ("own", few), ("own", many)] if n == largest else [])
        for quant, groups in builds:
            shared = quant == "shared"
            factory = f"IVF{knn.ivf_nlist(n if shared else n // groups)},PQ{pq}x{PQ_BITS}"
            idx = root / f"{quant}-{groups}"
            if shared and trained_src is not None:
                sg.copy_trained(trained_src, idx)
            with contextlib.redirect_stdout(sys.stderr):
                manifest, build_s = sg.index_dir(idx, root / "embeddings", entries, dim, factory, many // groups,
                                                 shared, nprobe, None)
            if shared and trained_src is None:
                trained_src = idx
            r = run_child("search", {"index": str(idx), "queries": str(qpath), "exact": str(epath),
                                     "nprobe": nprobe}, threads)
            row = {"vectors": n, "dim": dim, "groups": len(manifest["groups"]), "quantizer": quant,
                   "factory": factory, "build_s": round(build_s, 1), "data_and_exact_s": round(t_data, 1),
                   "nprobe": nprobe, "queries": mode["queries"], "k": RECALL_K, **r,
                   "index_bytes": sum(f.stat().st_size for f in (idx / "faiss").glob("*.index"))}
            log(f"scale search: {n} vectors, {groups} groups ({quant} quantizer): search {r['search_s']} s, "
                f"recall@50 {r['recall_at_50']}, rss {r['driver_peak_rss_mb']} MB (build {row['build_s']} s)")
            rows.append(row)
            if n == largest:
                by[(quant, groups)] = row
            if not (shared and idx == trained_src):
                shutil.rmtree(idx / "faiss", ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

    def cmp(quant: str) -> dict[str, Any]:
        a, b = by[(quant, few)], by[(quant, many)]
        return {"search_s": {str(few): a["search_s"], str(many): b["search_s"]},
                "recall_at_50": {str(few): a["recall_at_50"], str(many): b["recall_at_50"]},
                "vectors_scanned_per_query": {str(few): a["vectors_scanned_per_query"],
                                              str(many): b["vectors_scanned_per_query"]},
                "ratio": _ratio(b["search_s"], a["search_s"])}
    return {"data": "bench/search_groups.py mixture (n/100 centres, noise 1.5x centre norm), unit norm, "
                    "float16 shards", "search": "GalleryIndex(root, executor=LocalExecutor()) in a fresh process",
            "pq_bits": PQ_BITS, "sizes": rows,
            "groups_compared": {"vectors": largest, "few": few, "many": many, "shared_quantizer": cmp("shared"),
                                "per_group_quantizer": cmp("own")}}


# ------------------------------------------------------------------ targets and main

def target(value: float | None, goal: str) -> dict[str, Any]:
    op, bound = goal.split()
    met = None if value is None else (value <= float(bound) if op == "<=" else value >= float(bound))
    return {"value": None if value is None else round(float(value), 4), "goal": goal, "met": met}


def targets(io_res: dict[str, Any], search_res: dict[str, Any]) -> dict[str, Any]:
    rows = io_res["sizes"]
    n0 = min(r["n"] for r in rows)
    fixed = sorted((r for r in rows if r["n"] == n0), key=lambda r: r["gallery_images"])
    small, big = fixed[0], fixed[-1]
    g = search_res["groups_compared"]["shared_quantizer"]
    srows = sorted((r for r in search_res["sizes"] if r["quantizer"] == "shared"
                    and r["groups"] == search_res["groups_compared"]["few"]), key=lambda r: r["vectors"])
    verified = [r for r in rows if r["verify_pairs_per_s"] is not None]
    return {
        "bytes_read_ratio": target(big["bytes_read_ratio"], "<= 2"),
        "driver_rss_growth": target(big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], "<= 1.2"),
        "non_search_time_growth": target(big["non_search_s"] / small["non_search_s"], "<= 1.5"),
        "driver_rss_growth_search": target(srows[-1]["driver_peak_rss_mb"] / srows[0]["driver_peak_rss_mb"],
                                           "<= 1.2"),
        "search_groups_ratio": target(g["ratio"], "<= 1.3"),
        "verify_pairs_per_s": target(max((r["verify_pairs_per_s"] for r in verified), default=None), ">= 20000"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode_arg = ap.add_mutually_exclusive_group()
    mode_arg.add_argument("--smoke", action="store_true", help="seconds: tiny sizes in a temp dir (a run check)")
    mode_arg.add_argument("--quick", action="store_true", help="< 10 min on 2 cores")
    mode_arg.add_argument("--child-curate", default=None, help=argparse.SUPPRESS)
    mode_arg.add_argument("--child-search", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--encoder", default=None,
                    help=f"gallery encoder of the I/O part (default {ENCODER}; {TINY_ENCODER} with --smoke/--quick)")
    ap.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="executor of the curate runs (ray: make_executor('ray', num_workers=2); worker peak RSS "
                         "is reported)")
    ap.add_argument("--work", default=None, help="working directory (default: a temp dir, removed at the end)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch / faiss threads in every process (default 2; 1 with --smoke)")
    a = ap.parse_args(argv)
    if a.child_curate or a.child_search:
        fn = child_curate if a.child_curate else child_search
        print(json.dumps(fn(json.loads(a.child_curate or a.child_search))))
        return
    name = "smoke" if a.smoke else "quick" if a.quick else "full"
    mode = MODES[name]
    a.threads = a.threads or (1 if a.smoke else 2)
    import faiss
    import torch
    faiss.omp_set_num_threads(a.threads)   # the builds in this process too
    torch.set_num_threads(a.threads)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix=f"bench-scale-{name}-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    try:
        encoder = a.encoder or (TINY_ENCODER if a.smoke or a.quick else ENCODER)
        io_res = io_part(work, mode, encoder, a.threads, log, a.executor)
        t_io = time.perf_counter() - t0
        search_res = search_part(work, mode, a.threads, log)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "bench": "scale", "mode": name,
        "targets": targets(io_res, search_res),
        "io": io_res, "search": search_res,
        "machine": {"cpus": os.cpu_count(), "threads": a.threads, "python": platform.python_version(),
                    "load_average_1m_start": round(load0, 2), "load_average_1m_end": round(os.getloadavg()[0], 2),
                    "note": "wall times; other work on the machine (load above the thread count) slows them"},
        "seconds": {"io": round(t_io, 1), "search": round(time.perf_counter() - t0 - t_io, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    tune_allocator()  # index.core.allocator: as every command runs
    main()
