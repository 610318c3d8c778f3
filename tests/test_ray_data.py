"""The embedding stage as a Ray Data stream (jobs.ray_data) writes what embed_shard writes, with crops
cut on the encoders' device too (run on CPU here), and reuses finished shards."""
from __future__ import annotations

import pytest
import torch

from index.embed import EmbedTask, Embedder, embed_shard
from index.encoders import resolve_encoders
from index.gallery import list_shards
from test_index_build import CROPS, make_gallery, snapshot

pytestmark = pytest.mark.slow


def test_ray_data_stream_writes_the_local_files_with_crops_on_device(tmp_path, local_ray):
    from jobs.ray_data import embed_with_ray_data

    shards = list_shards(str(make_gallery(tmp_path / "g") / "*.tar"))
    specs = tuple(resolve_encoders(["test-tiny-timm"]))

    def tasks(out):
        return [EmbedTask(shard=s, out_dir=str(out), encoders=specs, crops=CROPS, batch_size=6) for s in shards]

    embedder = Embedder(specs, "cpu", crops_on_device=True)
    local = [embed_shard(t, embedder) for t in tasks(tmp_path / "local")]
    streamed = embed_with_ray_data(tasks(tmp_path / "ray"), specs, "cpu", num_encoders=1,
                                   crops_on_device=True, torch_threads=torch.get_num_threads())
    again = embed_with_ray_data(tasks(tmp_path / "ray"), specs, "cpu", crops_on_device=True)
    assert [r.num_vectors for r in streamed] == [r.num_vectors for r in local] == [12, 12, 9]
    assert [r.skipped for r in streamed] == [r.skipped for r in local]
    assert snapshot(tmp_path / "ray") == snapshot(tmp_path / "local")
    assert all(r.reused for r in again) and not any(r.reused for r in streamed)
