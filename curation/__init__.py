"""Curation: a named query set + a built index -> a curated transfer set (shards, manifest, report).

Builds on `index` (and `index.core`); never imports `distill` or `jobs` (a Ray executor is passed in
by the command line). Module map (one concept each):

    querysets.py     named query sets: the labelled few shots, the decontamination references, the test split
    datasets.py      raw readers for the datasets behind the query sets (Fashion-MNIST, EuroSAT, folders)
    features.py      image-level features of labelled images and gallery originals; the reference cache
    selection.py     selection strategies over the queries' kNN lists (query_balanced, best_matches,
                     random, text), deepening the search until they can decide
    copies.py        synthetic near-copies: the edits a web crawl applies (JPEG, resize, crop, ...)
    pixelkey.py      pixel keys: an encoder-independent second way to retrieve copy candidates
    verify.py        copy verification of one pair: align, then correlation and residual (copy_match)
    verify_batch.py  the same verification over many pairs at once, with the same scores
    calibrate.py     thresholds and the verification rule calibrated on synthetic copies of the references
    thresholds.py    the thresholds a run uses: given numbers as they are, "auto" ones calibrated
    decontam.py      leaks: retrieved images that may be the target's own images (B.4)
    dedup.py         duplicates: clusters of near-identical original images, one kept (B.3)
    copydetect.py    CopyDetector: leaks and duplicates behind one interface, each pair verified once
    changed.py       what curate does with a gallery image whose bytes changed since indexing
    shards.py        writing the curated set: crops re-materialised from the gallery, the query images
    timing.py        where a command's time went: named parts, and the summary line's "most time"
    report_data.py   what that report shows: ReportData and its panels, the thumbnails images become
    report.py        the curated set's report.html: the page's assembly from a ReportData
    report_sections.py  the HTML of each section of that report
    report_calibration.py  the report's calibration curves as plots
    report_evidence.py  the verification evidence shown for a leak (the aligned pair, the difference)
    report_thumbs.py the report's thumbnails of written images, kept by the write stage
    htmlpage.py      the page both HTML reports share: title, table of contents, sections, CSS
    plots.py         matplotlib figures as SVG data URIs for the reports
    run/             curate as named, resumable stages over one run state (its own module map)
    pipeline.py      CurateConfig and curate(cfg): the run's entry point over curation.run's stages
    cli.py           `curate` command line; prints the summary line
    build_index.py   the thin script `ray job submit` runs: the build-index command by script path
"""
