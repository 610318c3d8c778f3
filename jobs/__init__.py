"""Cluster jobs and the demo: the only package that imports ray; nothing in index/, curation/ or distill/
imports it. The command lines pass these in (an executor to build_gallery_index and curate, a launcher
to run_distill).

    executors.py     RayExecutor: the index.core Executor protocol on Ray actors; make_executor(name)
    ray_data.py      the embedding stage as a Ray Data stream: readers on CPU tasks, encoders in an actor pool
    train_ray.py     train_with_ray: the launcher of data-parallel student training on Ray Train
    demo.py          `make demo`: the whole pipeline on the demo data, with the commands a user types
    demo_gallery.py  the demo gallery built offline (Fashion-MNIST pool, planted leaks, photos, stamps)
    *.yaml           job configs: demo.yaml, yfcc15m.yaml, datacomp1b_crops.yaml
"""
