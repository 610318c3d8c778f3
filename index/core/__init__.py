"""The base layer: what every stage shares. It imports nothing else of the project.

    contract   the data contract between stages: file names, record fields, formats (one place)
    atomic     atomic writes (temp file, fsync, rename), JSON I/O, fingerprints, CODE_VERSION, crash points
    outdir     owned output directories: the owner marker, the run lock, refusing what a run did not write
    errors     UserError and its kinds (config, input, missing input, missing dependency); run_main for CLIs
    registry   one name -> object registry with did-you-mean, for encoders, query sets, selectors, methods
    config     from_mapping: every config dataclass built from a mapping, unknown keys refused
    executor   the Executor protocol (map over tasks with workers built where they run) and LocalExecutor
    allocator  glibc's allocator set for tensor work (large buffers reused, not faulted in again)
    images     the one image loader: bytes -> 8-bit RGB, EXIF orientation applied, transparency on
               white (as img2dataset re-encodes), CMYK and 16/32-bit converted, skip reasons for failures
    flags      command lines generated from config dataclasses (help in field metadata, --config FILE)

Layers above it, each importing only those below: index.core <- index <- curation <- distill <- jobs
<- the command-line modules. Nothing in the library imports jobs (tests/test_layers.py checks this).
"""
