"""Distillation backend: teach the target task to a VFM, transfer it to a small timm student, evaluate.

Builds on `index` (encoders, contract, atomic writes) and `curation` (query sets, the HTML page and
plots, timing); never imports `jobs`.

Modules (one concept each):

    config.py     DistillConfig: the frozen, fully resolved run configuration
    adapter.py    InputAdapter: each model resizes and normalises its own [0, 1] input
    teachers.py   VFM encoder + linear head; adaptation by linear probe or finetuning
    students.py   timm students (random init or local weights) with a linear head
    cache.py      teacher outputs (logits, features) computed once per transfer set, fingerprinted
    losses.py     pure loss functions: KD, AFT kernel distance, feature cosine / contrastive
    methods.py    METHODS registry: labels_only, kd, feature_kd, aft, kd_nearest, kd_weighted as tasks
                  returning named losses
    similarity.py task similarity of a representation to probe labels: PARC, CKA, RSA; teacher weights
    rank.py       rank candidate teachers on the labelled probe set from cached features
    ranking.py    RankConfig and rank(cfg): `distill rank`'s probe set (curated directory or query set)
    plots.py      figures as files: AFT's learned weight per pretrained model (PNG), the ranking (SVG)
    report.py     OUT/report.html: learning curves, per-class accuracy, confusion matrix, AFT weights
    data.py       transfer shards (webdataset stream), labelled query shards, test split
    trainer.py    AdamW + cosine with warmup, AMP, atomic checkpoints, exact resume
    evaluate.py   accuracy, per-class accuracy and the confusion matrix on the test split
    adaptation.py teachers of a run: adapt on the labels (probe / finetune) or keep the source head,
                  save, reload; rank and select the teachers of kd_nearest / kd_weighted
    caching.py    the cache pass: every teacher output a method reads, built once (caches.json)
    training.py   train_student: the student-training worker (in-process, or each data-parallel
                  worker started by a launcher the caller passes)
    run.py        run_distill(cfg) -> metrics: orchestration of the steps above, then evaluation
    cli.py        the `distill` and `distill rank` command lines, generated from DistillConfig / RankConfig;
                  prints the summary line

Imports go one way: run -> training -> caching -> adaptation -> (teachers, data, methods, rank, ...).
Nothing here imports jobs/: the cluster launcher for `workers > 1` is passed in (run_distill's
`launcher`; the `distill` command passes jobs.train_ray.train_with_ray).
"""
