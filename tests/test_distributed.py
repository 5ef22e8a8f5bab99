"""`trainer.distributed`: one process without any process group; two real processes (torchrun,
gloo on CPU) through Accelerate's collectives; the batch split as Accelerate splits inputs."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import PartialState

from trainer.distributed import SINGLE, current, init_from_env, shard, shutdown

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [0, 1, 2, 5, 8])
def test_shard_splits_as_accelerate_splits_inputs(count, world_size):
    items = list(range(count))
    covered = []
    for rank in range(world_size):
        offset, length = shard(count, rank, world_size)
        covered += items[offset : offset + length]
        if count < world_size:  # an empty share stays empty (Accelerate 1.0 repeats the last item)
            assert length == (1 if rank < count else 0)
            continue
        state = SimpleNamespace(num_processes=world_size, process_index=rank)
        with PartialState.split_between_processes(state, items) as theirs:
            assert items[offset : offset + length] == theirs
    assert covered == items


@pytest.mark.parametrize("env", [{}, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}])
def test_one_process_never_initialises_a_process_group(monkeypatch, env):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert init_from_env("cpu") is SINGLE and current() is SINGLE
    assert not torch.distributed.is_initialized()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    SINGLE.barrier()
    with SINGLE.main_process_first():
        pass
    SINGLE.broadcast_parameters([p])
    SINGLE.sum_gradients([p])
    assert SINGLE.all_reduce_floats([1.5, 2.0]) == [1.5, 2.0]
    assert SINGLE.any(True) and not SINGLE.any(False) and SINGLE.all(True) and not SINGLE.all(False)
    assert SINGLE.broadcast_object({"a": 1}) == {"a": 1}
    assert torch.equal(p, torch.ones(3)) and torch.equal(p.grad, torch.full((3,), 2.0))
    shutdown()
    assert not torch.distributed.is_initialized()


WORKER = textwrap.dedent(
    """
    import os

    import torch
    from trainer.distributed import current, init_from_env, shutdown

    dist = init_from_env("cpu")
    assert dist == current() and dist.enabled and dist.world_size == 2
    assert torch.distributed.get_backend() == "gloo"
    r = dist.rank
    with dist.main_process_first():  # rank 1 enters once rank 0 has left
        if r == 0:
            open("first", "w").close()
        else:
            assert os.path.exists("first")
    assert dist.all_reduce_floats([1.0 + r, 0.25]) == [3.0, 0.5]
    assert dist.any(r == 1) and not dist.any(False) and dist.all(True) and not dist.all(r == 0)
    assert dist.broadcast_object({"from": r}) == {"from": 0}

    # rank 0's start everywhere, whatever each parameter's dtype
    a = torch.nn.Parameter(torch.full((2, 3), float(r)))
    b = torch.nn.Parameter(torch.full((4,), 10.0 + r, dtype=torch.float64))
    dist.broadcast_parameters([a, b])
    assert torch.equal(a, torch.zeros(2, 3)) and torch.equal(b, torch.full((4,), 10.0, dtype=torch.float64))

    # sums across buckets; None on one process counts as zeros, None on both stays None
    c, d = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(1))
    a.grad = torch.full((2, 3), 1.0 + r)
    b.grad = torch.full((4,), 1.0, dtype=torch.float64) if r == 0 else None
    c.grad = torch.arange(5.0) * (r + 1)
    dist.sum_gradients([a, b, c, d], bucket_mb=8 * 4 / 2**20)  # 8 floats a bucket
    assert torch.equal(a.grad, torch.full((2, 3), 3.0))
    assert b.grad is not None and b.grad.dtype == torch.float64 and torch.equal(b.grad, torch.ones(4, dtype=torch.float64))
    assert torch.equal(c.grad, torch.arange(5.0) * 3) and d.grad is None
    dist.barrier()
    shutdown()
    assert not torch.distributed.is_initialized()
    open(f"ok_{r}", "w").close()  # a file each: the two processes' stdout can interleave
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_processes_through_accelerate(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(path.name for path in tmp_path.glob("ok_*")) == ["ok_0", "ok_1"]
