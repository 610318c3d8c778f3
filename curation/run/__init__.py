"""A curation run as named, resumable stages over one run state.

    state.py         RunState (config, query set, index, results so far), Filtered, record (de)serialisation
    records.py       StageStore: DIR/.curate/<stage>.{json,npz}, fingerprint-checked
    stages.py        the stages in order and the orchestrator `run_stages`
    workers.py       units of work fanned out over the executor (original embedding, crop materialisation
                     and the report's thumbnails of the written images)
    report_items.py  which images the report shows (pure; the write and report stages share it)
    report_stage.py  the report stage's body: the run's state -> curation.report.ReportData -> report.html
"""
