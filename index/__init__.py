"""Indexing: gallery shards -> crop recipes -> embeddings -> sharded FAISS indexes, and their search.

Layers (imports go one way): index.core <- index <- curation <- distill <- jobs <- the CLI modules.
`index.core` is the base every package builds on and imports nothing else of the project; the rest
of `index/` imports only `index.core`, itself and third-party libraries, never `curation`, `distill`
or `jobs`.

Modules (one concept each):

    core/            the base layer: data contract, atomic writes and fingerprints (CODE_VERSION),
                     Registry, UserError family and run_main, from_mapping for every config dataclass,
                     the Executor protocol with LocalExecutor, owned output dirs, flags from dataclasses
    config.py        IndexConfig, FaissConfig: the indexing job config (YAML), loaded with from_mapping
    download.py      url list -> WebDataset gallery with img2dataset, and its stats
    gallery.py       gallery readers (WebDataset tars, image folders) yielding images with every skip counted
    tar_reader.py    tar shards read as webdataset reads them, member offsets kept, every break counted
    skips.py         why gallery entries are skipped: SKIP_REASONS and SkipCounts
    content.py       content hashes taken while bytes are read; regular-file checks
    ranged.py        one range read per gallery image, by the location recorded at index time
    crops.py         crop recipes: a crop is a pure function of (image id, crop index, seed)
    encoder_spec.py  EncoderSpec: what an encoder name resolves to (weights, dims, preprocessing), frozen
    encoder_family.py  EncoderFamily (one registry entry per family) and the Encoder module
    encoder_families/  the registered families: EfficientNet-Lite, timm, open_clip, test encoders
    encoders.py      the encoder registry's front: resolve a name, build a model, its transform and head
    model_configs/   open_clip configs of the tiny random-init test models (JSON)
    device.py        pick_device: where models run (indexing, curation and distillation alike)
    threads.py       how many CPU threads a command computes with on a shared machine
    encode.py        the encoder forward: pixel batches or whole images -> L2-normalised features
    embed.py         the embedding stage's unit of work: one gallery shard -> one embedding shard
    device_decode.py JPEG decode on the device, batched, the CPU decoder as fallback
    device_crops.py  crops cut from their recipes on image tensors (the GPU path)
    device_batches.py  the embedding stage's batches when crops are cut on the device
    store.py         embedding shards on disk: float16 matrices in a folder per encoder, the row table, done last
    knn.py           one FAISS index per shard group: combined vectors, factory rule, training, build
    faiss_io.py      FAISS index files: atomic writes, memory-mapped reads
    faiss_gpu.py     IVF groups on faiss's GPU indexes where the `gpu` extra is installed
    topk.py          exact top-k lists: selection with ties by id, ordering, merge (every search path)
    torch_search.py  exact inner-product top-k in torch (block GEMM + top-k), no cap on k
    search.py        top-k over the gallery: exact streaming search, fan-out over groups, exact merge
    gallery_index.py a built index directory opened for querying: encoders, groups, rows, shards
    build.py         the indexing stage: embed shards, train the shared quantizer, fill groups, manifest
    cli.py           the indexing command lines (download-gallery, build-index); prints their summaries
"""
