"""jobs.shm_allreduce: the shared-memory gradient mean of co-located ranks, in real gloo process groups."""
from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not Path("/dev/shm").is_dir(),
                                reason="the shared-memory path needs x86-64 and /dev/shm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(fn, world: int, tmp: Path, *args) -> list[dict]:
    port = _free_port()
    mp.start_processes(_entry, args=(fn, world, port, str(tmp), args), nprocs=world, join=True, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _entry(rank: int, fn, world: int, port: int, tmp: str, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    torch.save(out, Path(tmp) / f"rank{rank}.pt")


def _means(rank: int, world: int, sizes: list[int]) -> dict:
    from jobs.shm_allreduce import SHM_DIR, SharedMemoryAllReduce

    before = set(SHM_DIR.glob("densenas-allreduce-*"))
    sync = SharedMemoryAllReduce.for_group(max(sizes))
    assert sync is not None
    dist.barrier()   # rank 0 has unlinked it
    left = set(SHM_DIR.glob("densenas-allreduce-*")) - before
    results, inputs = [], []
    for call, n in enumerate(sizes):
        g = torch.Generator().manual_seed(1000 * call + rank)
        x = torch.randn(n, generator=g)
        inputs.append(x.clone())
        results.append(sync.mean_(x).clone())
    sync.close()
    return {"results": results, "inputs": inputs, "segments_left": sorted(str(p) for p in left)}


def test_mean_matches_and_is_identical_on_every_rank(tmp_path):
    sizes = [1000, 7, 1000, 513, 1, 1000]   # varying sizes, more calls than the two buffers
    outs = _run(_means, 3, tmp_path, sizes)
    for call in range(len(sizes)):
        expected = sum(o["inputs"][call] for o in outs) / 3
        for o in outs:
            torch.testing.assert_close(o["results"][call], expected)
            assert torch.equal(o["results"][call], outs[0]["results"][call])   # bit for bit on every rank
    # the segment is unlinked once every rank has mapped it: nothing stays in /dev/shm
    assert all(not o["segments_left"] for o in outs)


def _ddp_step(rank: int, world: int, use_shm: bool) -> dict:
    from jobs.shm_allreduce import SharedMemoryAllReduce, shared_memory_mean_hook

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    if use_shm:
        sync = SharedMemoryAllReduce.for_group(sum(p.numel() for p in model.parameters()))
        ddp.register_comm_hook(sync, shared_memory_mean_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()]}


def test_ddp_comm_hook_trains_like_gloo(tmp_path):
    (tmp_path / "shm").mkdir()
    (tmp_path / "gloo").mkdir()
    shm = _run(_ddp_step, 2, tmp_path / "shm", True)
    gloo = _run(_ddp_step, 2, tmp_path / "gloo", False)
    for a, b in zip(shm[0]["params"], shm[1]["params"]):
        assert torch.equal(a, b)                       # identical weights on both ranks
    for a, b in zip(shm[0]["params"], gloo[0]["params"]):
        torch.testing.assert_close(a, b)               # the same training as DDP's gloo all-reduce


def _a_rank_that_never_comes(rank: int, world: int) -> dict:
    from jobs.shm_allreduce import SharedMemoryAllReduce

    sync = SharedMemoryAllReduce.for_group(4, timeout_s=0.5)
    error = None
    if rank == 0:   # rank 1 never calls: as if it had died
        try:
            sync.mean_(torch.ones(4))
        except TimeoutError as e:
            error = str(e)
    dist.barrier()
    return {"error": error}


def test_a_missing_rank_times_out_with_its_number(tmp_path):
    outs = _run(_a_rank_that_never_comes, 2, tmp_path)
    assert outs[0]["error"] and "rank 1 did not reach gradient all-reduce call 1 within 0.5s" in outs[0]["error"]


def _refusals(rank: int, world: int) -> dict:
    from jobs.shm_allreduce import SharedMemoryAllReduce
    from jobs.train import allreduce_mean, gradient_mean

    logged: list[str] = []
    too_big = SharedMemoryAllReduce.for_group(1 << 20, log=logged.append, max_bytes=1 << 20)
    off = gradient_mean([torch.zeros(10)], False, torch.device("cpu"))
    on = gradient_mean([torch.zeros(10)], True, torch.device("cpu"))
    grads = [torch.full((2, 3), float(rank)), torch.full((4,), 10.0 * rank)]
    on(grads)
    sync = SharedMemoryAllReduce.for_group(8)
    with pytest.raises(ValueError, match="at most 8 elements"):
        sync.mean_(torch.zeros(9))
    return {"too_big": too_big is None, "logged": logged, "off_is_gloo": off is allreduce_mean,
            "on_is_shm": on is not allreduce_mean, "grads": grads}


def test_refusals_fall_back_to_gloo_and_bad_input_is_named(tmp_path):
    outs = _run(_refusals, 2, tmp_path)
    assert outs[0]["too_big"] and outs[1]["too_big"]
    assert outs[0]["logged"] and "over 1 MiB" in outs[0]["logged"][0] and not outs[1]["logged"]
    assert outs[0]["off_is_gloo"] and outs[0]["on_is_shm"]
    for o in outs:   # gradient_mean's list-of-tensors form: the mean, in each tensor's shape
        torch.testing.assert_close(o["grads"][0], torch.full((2, 3), 0.5))
        torch.testing.assert_close(o["grads"][1], torch.full((4,), 5.0))


_FAULTS_PROBE = """
import resource, sys, threading, torch
sys.path.insert(0, {repo!r})
from jobs.train import keep_freed_memory
kept = keep_freed_memory() if {keep} else None
out = {{}}
def steps():   # a training step's pattern: activations allocated, used, freed, again
    faults = []
    for _ in range(12):
        f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        xs = [torch.ones(1 << 18) for _ in range(8)]     # 8 x 1 MiB
        del xs
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)
    out["faults"] = faults
t = threading.Thread(target=steps); t.start(); t.join()
print(kept, max(out["faults"][5:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and RUSAGE_THREAD")
def test_keep_freed_memory_stops_page_faults_from_step_to_step():
    import subprocess

    def probe(keep: bool) -> tuple[str, int]:   # in a fresh process: mallopt is process-wide
        out = subprocess.run([sys.executable, "-c", _FAULTS_PROBE.format(repo=str(REPO), keep=keep)],
                             capture_output=True, text=True, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        kept, faults = out.stdout.split()
        return kept, int(faults)

    kept, faults = probe(True)
    assert kept == "True"
    assert faults < 100          # once the heap has grown, each step reuses the last one's memory
    # (without it the same pattern faulted 0-2,000 pages a step, varying between runs: glibc adapts its
    # thresholds as it goes, so the default is not asserted)
