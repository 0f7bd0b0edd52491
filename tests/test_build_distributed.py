"""torchrun with 2 CPU processes (gloo) gives the same atlas as one process."""
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from atlas.build import build

TABLES = ["images.parquet", "channels.parquet", "top_activations.parquet", "switches.parquet",
          "activations/layer=conv4/part-0.parquet"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
OPTS = dict(k=4, batch_size=4, chunk_size=8, image_size=32, progress=False)

DYING_RANK = """
import os, sys
import atlas.build as b
real = b._flush_chunk
def flush(miner, work):
    real(miner, work)
    if os.environ["RANK"] == "1":
        os._exit(3)  # rank 1 dies after its first chunk
b._flush_chunk = flush
b.build("zfnet-mini", sys.argv[1], sys.argv[2], k=4, batch_size=4, chunk_size=8, image_size=32, progress=False)
"""


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_folder):
    """The atlas one process builds with OPTS: what both multi-rank builds must equal (read only)."""
    return build("zfnet-mini", str(tiny_folder), tmp_path_factory.mktemp("one") / "one", **OPTS)


def same(p, q):
    for t in TABLES:
        assert pq.read_table(p / t).equals(pq.read_table(q / t)), t


@pytest.mark.determinism
def test_two_ranks_build_the_same_atlas(tmp_path, tiny_folder, one_process):
    out = tmp_path / "two"
    res = subprocess.run(TORCHRUN + ["-m", "atlas", "build", "--model", "zfnet-mini", "--data", str(tiny_folder),
                                     "--out", str(out), "--k", "4", "--batch-size", "4", "--chunk-size", "8",
                                     "--image-size", "32", "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    same(one_process, out)
    assert "ranks" in (out / "manifest.json").read_text()


def test_a_dying_rank_fails_the_job_and_resume_finishes_it(tmp_path, tiny_folder, one_process, monkeypatch):
    out = tmp_path / "a"
    script = tmp_path / "dying.py"
    script.write_text(DYING_RANK)
    res = subprocess.run(TORCHRUN + [str(script), str(tiny_folder), str(out)], capture_output=True, text=True)
    assert res.returncode != 0 and not out.exists()
    work = tmp_path / "a.partial" / "work"
    before = sorted(p.name for p in work.glob("chunk-*.npz"))
    assert before and len(before) < 5  # 36 images / 8 per chunk = 5 chunks
    import atlas.build as b

    real, redone = b._flush_chunk, []
    monkeypatch.setattr(b, "_flush_chunk", lambda miner, w: (redone.append(miner.chunk), real(miner, w)))
    build("zfnet-mini", str(tiny_folder), out, resume=True, **OPTS)
    assert len(redone) == 5 - len(before) and not {f"chunk-{c:05d}.npz" for c in redone} & set(before)
    same(one_process, out)
