"""Benchmark: the Train stages' epoch time against the same steps in one plain process.

    python bench/bench_overhead.py [--workers 1,2] [--stages search,retrain] [--modes memory]
                                   [--search-epochs 6] [--retrain-epochs 5] [--baseline-runs 2]
                                   [--json docs/benchmarks/overhead.json]

The demo's data (configs/tiny.yaml: Fashion-MNIST, 10 classes, 200 per class split 80/20, 100 per
class held out) is split into a temporary local store. For each stage and worker count:

- stage: ``jobs.search.run`` / ``jobs.retrain.run`` through Ray Train (1 CPU and one
  torch thread per worker, gloo, checkpoints every epoch to the store). Its epoch time is the median
  wall-clock interval between consecutive epoch ends on rank 0 (``epoch_ends`` in
  ``workers/rank-0.json``), so data loading, gradient all-reduce, derive, report and checkpoint
  are all inside it; the first epoch (start-up) and, in retrain, the last (test evaluation) are
  left out.
- in process: the same per-rank work (one rank's rows, its per-worker batch, its step count, the
  same thread count) with ``densenas.search.Searcher.run_epoch`` / ``densenas.retrain.train_epoch``
  in one plain Python process, no Ray, batches already in memory as tensors: pure compute. It runs
  in a fresh child process with ``OMP_NUM_THREADS`` set as Ray sets it for a 1-CPU worker, once
  before the stage and once after it (``--baseline-runs``), and its epoch time is the median over
  the epochs of all those runs: a single run's epochs swung by 2x on an idle machine, and running it
  inside the benchmark's own process (the Ray driver) gave it a different environment from the stage's.

Prints ratio = stage epoch time / in-process epoch time (goal <= 1.3). For 2+ workers it also runs the
per-rank work in one plain process per rank joined by ``torch.distributed`` (gloo), no Ray, with the
stage's gradient synchronisation (retrain: DDP without buffer broadcast; search: one flat all-reduce per
step; both through shared memory unless ``--no-shared-memory-allreduce``), after the stage, and prints the
stage's ratio to that too ("plain DDP"): the part of the gap that data-parallel training costs without Ray.
Retrain rows also give each rank's median training-loop wall and CPU seconds (``train_loop_median``):
wall minus CPU is time the rank waited. The Train workers call ``jobs.train.keep_freed_memory()``; the
baselines run with glibc's defaults unless ``--baseline-keep-freed-memory``. The search stage uses
tiny.yaml's search settings with the MACs cost model (no profile stage) and ``--search-epochs``
epochs (1 weights-only warm-up, the rest search epochs; the search epochs are compared); the retrain
stage a network derived from the seeded super network with tiny.yaml's retrain settings. Records
``uptime`` before and after (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from bench.machine import uptime as _uptime  # noqa: E402


def _intervals(ends: list[dict]) -> dict[int, float]:
    """{epoch: seconds since the previous epoch ended} (the first epoch has no interval)."""
    ends = sorted(ends, key=lambda e: e["epoch"])
    return {b["epoch"]: b["time"] - a["time"] for a, b in zip(ends, ends[1:]) if b["epoch"] == a["epoch"] + 1}


# What a Train worker's training thread was doing, by the first matching frame name in its stack
# (most specific first). Stacks outside the worker loop (Ray's own threads) are not counted.
CATEGORIES = (
    ("report + checkpoint", ("report_checkpoint", "publish_latest", "report (", "put_json", "put_bytes")),
    ("waiting for Ray Data batches", ("iter_torch_batches", "iter_batches", "_iter_batches", "get_next")),
    ("gradient all-reduce", ("allreduce_mean", "all_reduce", "_sync_buffers", "reducer", "mean_ (jobs/shm",
                             "shared_memory_mean")),
    ("augmentation + batching", ("augment_batch", "crop_resize", "roi_align", "grid_sample", "WorkerSplit.batches",
                                  "batches (jobs/data.py")),
    ("loading the worker's rows", ("load_worker_split", "read_worker_rows", "_decode_rows")),
    ("derive + epoch record", ("derive", "epoch_record", "collapse_warnings")),
    ("backward", ("backward", "autograd.grad", "run_backward")),
    ("forward", ("forward", "_call_impl")),
    ("optimizer", ("step (torch/optim", "optimizer", "_single_tensor", "_multi_tensor")),
)
LOOPS = ("_search_worker", "_retrain_worker")


def summarise_stacks(path: Path) -> dict[str, float]:
    """Share of the training thread's samples per category, from a ``py-spy record --format raw`` file."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not any(loop in stack for loop in LOOPS) or not n.isdigit():
            continue
        frames = stack.split(";")
        cat = "other"
        for frame in reversed(frames):   # leaf first
            hit = next((c for c, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if hit:
                cat = hit
                break
        counts[cat] = counts.get(cat, 0) + int(n)
    total = sum(counts.values()) or 1
    return {k: round(v / total, 3) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def _ray_processes() -> dict[int, str]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::") or "raylet" in cmd or "gcs_server" in cmd:
                out[int(d.name)] = cmd.split()[0] if cmd.startswith("ray::") else Path(cmd.split()[0]).name
    return out


def _cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    try:
        path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
        fields = Path(path).read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _thread_cpu(pid: int) -> dict[str, float]:
    """{thread name: CPU seconds} over the process's threads (threads of one name summed)."""
    out: dict[str, float] = {}
    try:
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return out
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        cpu = _cpu_seconds(pid, tid)
        if cpu is not None:
            out[name] = out.get(name, 0.0) + cpu
    return out


def _machine_cpu() -> dict[str, int]:
    """Machine-wide jiffies from /proc/stat: user+nice, system, idle+iowait, steal."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return {"user": f[0] + f[1], "system": f[2] + f[5] + f[6], "idle": f[3] + f[4], "steal": f[7] if len(f) > 7 else 0}


class StageProfiler(threading.Thread):
    """Once ``ready()`` (the first epoch ended), py-spy records every Ray Train worker for ``duration`` s (raw folded stacks,
    idle included, not pausing the process) and /proc gives every Ray process's CPU seconds over the
    same window."""

    def __init__(self, out_dir: Path, tag: str, ready, duration: float, delay: float = 0.5):
        super().__init__(daemon=True)
        self.out_dir, self.tag, self.ready, self.duration, self.delay = out_dir, tag, ready, duration, delay
        self.result: dict = {}

    def run(self) -> None:
        t_start = time.time()
        while not self.ready() and time.time() - t_start < 600:
            time.sleep(0.2)
        time.sleep(self.delay)
        procs = _ray_processes()
        before = {p: _cpu_seconds(p) for p in procs}
        workers = [p for p, name in procs.items() if "TrainWorker" in name]
        threads_before = {p: _thread_cpu(p) for p in workers}
        machine_before = _machine_cpu()
        spies = []
        for pid, name in procs.items():
            if "RayTrainWorker" in name or "TrainWorker" in name:
                out = self.out_dir / f"{self.tag}-pid{pid}.txt"
                spies.append((pid, out, subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration",
                     str(int(self.duration)), "--rate", "50", "--format", "raw", "--idle", "--nonblocking",
                     "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        t0 = time.time()
        time.sleep(self.duration)
        wall = time.time() - t0
        cpu: dict[str, float] = {}
        for pid, name in procs.items():
            b, a = before.get(pid), _cpu_seconds(pid)
            if b is not None and a is not None:
                cpu[name] = round(cpu.get(name, 0.0) + a - b, 2)
        threads = {}
        for p in workers:
            after_t = _thread_cpu(p)
            used = {n: round(c - threads_before[p].get(n, 0.0), 2) for n, c in after_t.items()}
            threads[str(p)] = {n: c for n, c in sorted(used.items(), key=lambda kv: -kv[1]) if c > 0}
        machine_after = _machine_cpu()
        machine = {k: round((machine_after[k] - machine_before[k]) / os.sysconf("SC_CLK_TCK"), 2) for k in machine_after}
        for pid, out, proc in spies:
            proc.wait(timeout=self.duration + 60)
        self.result = {"window_s": round(wall, 1), "cpu_seconds_by_process": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
                       "train_worker_cpu_seconds_by_thread": threads, "machine_cpu_seconds": machine,
                       "train_thread_share": {str(pid): summarise_stacks(out) for pid, out, _ in spies if out.exists()}}


def _tiny() -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())


def _search_settings(tiny: dict, epochs: int) -> dict:
    s = {k: v for k, v in tiny["search"].items() if k not in ("workers", "cpus_per_worker", "data_cpus")}
    return s | {"epochs": epochs, "warmup_epochs": 1, "cost": "macs"}


def _barrier(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()


def in_process_search(manifest, split_store, space, settings: dict, workers: int, threads: int, rank: int = 0,
                      distributed: bool = False, shared_memory: bool = True) -> dict:
    """Per-epoch seconds of one rank's search epochs in this process (pure compute; with ``distributed``,
    in a gloo process group with the stage's gradient all-reduce: through shared memory with ``shared_memory``)."""
    import torch

    from densenas.latency import load_cost_model
    from densenas.search import SearchConfig, Searcher
    from densenas.supernet import SuperNet
    from jobs.data import load_worker_split, stream_seed
    from jobs.train import gradient_mean, steps_per_worker

    torch.set_num_threads(threads)
    cfg = SearchConfig.model_validate(settings)
    counts = manifest["counts"]
    batch, steps = steps_per_worker(int(counts["train"]), workers, cfg.batch_size)
    # as the stage (jobs.search.run): architecture batches of arch_batch_size when the config sets it
    val_batch, val_steps = steps_per_worker(int(counts["val"]), workers, cfg.arch_batch_size or cfg.batch_size)
    train = load_worker_split(manifest, ["train"], split_store, rank=rank, world=workers, augment=True,
                              input_size=space.input_size, channels=space.in_channels)
    val = load_worker_split(manifest, ["val"], split_store, rank=rank, world=workers, augment=False,
                            input_size=space.input_size, channels=space.in_channels)
    torch.manual_seed(cfg.seed)
    net = SuperNet(space, num_classes=int(manifest["num_classes"]))
    cost = load_cost_model(cfg.cost, space, skip_fraction=cfg.macs_skip_fraction)
    searcher = Searcher(net, cfg, cost, steps_per_epoch=steps, device="cpu", log=None,
                        grad_sync=gradient_mean(list(net.parameters()), shared_memory, torch.device("cpu"))
                        if distributed else None)
    out = {}
    while searcher.epoch < cfg.epochs:
        e = searcher.epoch
        tb = list(train.batches(batch, stream_seed(cfg.seed, e, rank, "train"), shuffle=True, drop_last=True))[:steps]
        vb = list(val.batches(val_batch, stream_seed(cfg.seed, e, rank, "val"), shuffle=True,
                              drop_last=True))[:val_steps]
        _barrier(distributed)
        t0 = time.perf_counter()
        rec = searcher.run_epoch(tb, vb)
        out[searcher.epoch] = {"seconds": time.perf_counter() - t0, "phase": rec["phase"]}
    return {"epochs": out, "batch": batch, "steps": steps, "val_batch": val_batch, "val_steps": val_steps}


def in_process_retrain(manifest, split_store, arch, rcfg, workers: int, threads: int, rank: int = 0,
                       distributed: bool = False, shared_memory: bool = True) -> dict:
    """Per-epoch seconds of one rank's retrain epochs in this process (pure compute; with ``distributed``,
    in a gloo process group under DDP as the stage wraps it, its buckets through shared memory with
    ``shared_memory``)."""
    import torch

    from densenas.arch import build_model
    from densenas.retrain import build_optimizer, build_scheduler, train_epoch
    from jobs.data import load_worker_split, stream_seed
    from jobs.train import steps_per_worker

    torch.set_num_threads(threads)
    counts = manifest["counts"]
    batch, steps = steps_per_worker(int(counts["train"]) + int(counts["val"]), workers, rcfg.batch_size)
    data = load_worker_split(manifest, ["train", "val"], split_store, rank=rank, world=workers, augment=True,
                             input_size=arch.input_size, channels=arch.in_channels)
    torch.manual_seed(rcfg.seed)
    model = build_model(arch, num_classes=int(manifest["num_classes"]), dropout=rcfg.dropout)
    opt = build_optimizer(model, rcfg)
    sched = build_scheduler(opt, rcfg, steps)
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if distributed else model
    if distributed and shared_memory:   # as jobs.retrain wraps it
        from jobs.shm_allreduce import SharedMemoryAllReduce, shared_memory_mean_hook

        shm = SharedMemoryAllReduce.for_params(model.parameters(), torch.device("cpu"))
        if shm is not None:
            net.register_comm_hook(shm, shared_memory_mean_hook)
    out = {}
    for e in range(rcfg.epochs):
        b = list(data.batches(batch, stream_seed(rcfg.seed, e, rank, "train"), shuffle=True, drop_last=True))[:steps]
        _barrier(distributed)
        t0 = time.perf_counter()
        r = train_epoch(net, b, opt, sched, rcfg, "cpu")
        out[e + 1] = {"seconds": time.perf_counter() - t0, "train_seconds": r["seconds"],
                      "train_cpu_seconds": r["cpu_seconds"], "train_page_faults": r["page_faults"]}
    return {"epochs": out, "batch": batch, "steps": steps}


def _baseline_child(spec_path: str, out_path: str) -> int:
    """Run one in-process baseline from a JSON spec (see ``in_process``) and write its result as JSON."""
    from cluster.storage import open_store
    from densenas.arch import load_arch
    from densenas.space import load_space
    from jobs.retrain import RetrainConfig

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("keep_freed_memory"):
        from jobs.train import keep_freed_memory

        keep_freed_memory()
    split_store = open_store(spec["split_root"])
    rank, distributed = int(os.environ.get("RANK", "0")), spec["distributed"]
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=spec["workers"])
    if spec["stage"] == "search":
        out = in_process_search(spec["manifest"], split_store, load_space(spec["space"]), spec["settings"],
                                spec["workers"], spec["threads"], rank, distributed, spec["shared_memory"])
    else:
        out = in_process_retrain(spec["manifest"], split_store, load_arch(spec["arch"]),
                                 RetrainConfig.model_validate(spec["retrain"]), spec["workers"], spec["threads"],
                                 rank, distributed, spec["shared_memory"])
    if rank == 0:
        Path(out_path).write_text(json.dumps(out))
    return 0


def in_process(spec: dict, tmp: Path, tag: str, distributed: bool = False) -> dict:
    """One baseline run in a fresh Python process with the thread settings of a 1-CPU Ray worker; with
    ``distributed``, one such process per rank in a plain torch.distributed (gloo) group, no Ray:
    rank 0's epochs."""
    spec_path, out_path = tmp / f"{tag}-spec.json", tmp / f"{tag}-out.json"
    spec_path.write_text(json.dumps(spec | {"distributed": distributed}))
    threads = str(spec["threads"])
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-child", str(spec_path), str(out_path)]
    if not distributed:
        subprocess.run(cmd, env=env, check=True, cwd=str(REPO))
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(spec["workers"])}
        procs = [subprocess.Popen(cmd, env=env | {"RANK": str(r)}, cwd=str(REPO)) for r in range(spec["workers"])]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError(f"the distributed in-process baseline {tag} failed (its ranks' output is above); "
                               "--no-ddp-baseline skips it")
    out = json.loads(out_path.read_text())
    out["epochs"] = {int(k): v for k, v in out["epochs"].items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--stages", default="search,retrain")
    ap.add_argument("--modes", default="memory", help="data_loading modes of the stage: memory, ray_data")
    ap.add_argument("--search-epochs", type=int, default=6)
    ap.add_argument("--retrain-epochs", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here (e.g. docs/benchmarks/overhead.json)")
    ap.add_argument("--profile", default=None, help="py-spy + /proc CPU time of each stage run into this folder")
    ap.add_argument("--profile-seconds", type=float, default=8.0, help="recorded from the end of the first epoch")
    ap.add_argument("--baseline-runs", type=int, default=2,
                    help="in-process runs per row, alternating before and after the stage (default: 2)")
    ap.add_argument("--ddp-baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="for 2+ workers also run the per-rank work in plain torch.distributed processes (default: on)")
    ap.add_argument("--shared-memory-allreduce", action=argparse.BooleanOptionalAction, default=True,
                    help="the stage's (and the plain DDP baseline's) per-step gradient mean through /dev/shm "
                         "(TrainJobResources.shared_memory_allreduce); --no-shared-memory-allreduce: gloo")
    ap.add_argument("--baseline-keep-freed-memory", action="store_true",
                    help="the in-process baselines (and plain DDP) call jobs.train.keep_freed_memory() as the "
                         "Train workers do (default: glibc's defaults, a plain process)")
    ap.add_argument("--baseline-child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline_child:
        return _baseline_child(*args.baseline_child)

    import ray
    import torch

    from cluster.storage import open_store
    from densenas.arch import load_arch
    from densenas.derive import derive
    from densenas.latency import describe_device
    from densenas.space import load_space
    from densenas.supernet import SuperNet
    from densenas.latency import MacsCostModel
    from jobs import retrain, search, split
    from jobs.context import StageContext
    from jobs.retrain import RetrainConfig
    from jobs.search import SearchJobConfig
    from jobs.split import SplitConfig

    load_before = _uptime()
    print(f"uptime before: {load_before}", flush=True)
    tiny = _tiny()
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    split_store = open_store(str(tmp / "split"))
    d = tiny["data"]
    split_out = split.run(SplitConfig(classes=d["classes"], max_per_class=d["max_per_class"],
                                      val_fraction=d["val_fraction"], test_max_per_class=d["test_max_per_class"],
                                      shard_size=d["shard_size"], seed=d["seed"], executor="local"),
                          None, StageContext.standalone(split_store))
    manifest = split_out.model_dump()
    space = load_space(tiny["space"])
    settings = _search_settings(tiny, args.search_epochs)
    torch.manual_seed(0)
    arch = derive(SuperNet(space, num_classes=int(manifest["num_classes"]))).arch
    arch = load_arch(arch.to_json())
    r = tiny["retrain"]
    rows = []
    workers_list = [int(w) for w in args.workers.split(",")]
    modes = args.modes.split(",")
    stages = args.stages.split(",")
    def run_stage(stage: str, job: dict, store) -> None:
        if stage == "search":
            job = SearchJobConfig.model_validate(job | settings)
            search.run(job, search.SearchInputs(space, split_out, split_store,
                                                MacsCostModel(space, skip_fraction=job.macs_skip_fraction)),
                       StageContext.standalone(store))
        else:
            rcfg = RetrainConfig(epochs=args.retrain_epochs, batch_size=r["batch_size"], lr=r["lr"],
                                 measure_latency=False, export=False, **job)
            retrain.run(rcfg, retrain.RetrainInputs(arch, split_out, split_store), StageContext.standalone(store))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for stage in stages:
            for w in workers_list:
                threads = 1
                spec = {"stage": stage, "split_root": str(tmp / "split"), "manifest": split_out.model_dump(mode="json"),
                        "workers": w, "threads": threads, "space": tiny["space"], "settings": settings,
                        "shared_memory": args.shared_memory_allreduce,
                        "keep_freed_memory": args.baseline_keep_freed_memory,
                        "arch": arch.to_json(),
                        "retrain": RetrainConfig(epochs=args.retrain_epochs, batch_size=r["batch_size"], lr=r["lr"],
                                                 workers=w, cpus_per_worker=1, max_failures=0, measure_latency=False,
                                                 export=False).model_dump(mode="json")}
                baselines: list[dict] = []

                def baseline_epochs(run: dict) -> list[float]:
                    # the same epochs as the stage's: search epochs after the first, retrain epochs after the first
                    if stage == "search":
                        return [v["seconds"] for e, v in run["epochs"].items() if v["phase"] == "search" and e > 2]
                    return [v["seconds"] for e, v in run["epochs"].items() if e > 1]

                def run_baseline() -> None:
                    run = in_process(spec, tmp, f"{stage}-{w}-base{len(baselines)}")
                    baselines.append(run)
                    print(f"{stage:8s} {w} worker(s) in process, run {len(baselines)}: epochs "
                          f"{ {k: round(v['seconds'], 2) for k, v in run['epochs'].items()} }", flush=True)

                for mode in modes:
                    # baseline runs alternate with the stage: half before it (at least one), the rest after
                    while len(baselines) < max(1, (args.baseline_runs + 1) // 2):
                        run_baseline()
                    store = open_store(str(tmp / f"{stage}-{w}-{mode}"))
                    # ray_data keeps a CPU free for its decode tasks: the workers share the other one
                    cpus = 1 if mode == "memory" else 1 / w
                    job = {"workers": w, "cpus_per_worker": cpus, "max_failures": 0, "data_loading": mode,
                           "data_cpus": 1, "shared_memory_allreduce": args.shared_memory_allreduce}
                    prof = None
                    if args.profile:
                        Path(args.profile).mkdir(parents=True, exist_ok=True)
                        prof = StageProfiler(Path(args.profile), f"{stage}-{w}w-{mode}",
                                             lambda st=store: st.exists("workers/rank-0.json"), args.profile_seconds)
                        prof.start()
                    t0 = time.time()
                    try:
                        run_stage(stage, job, store)
                    except Exception as e:  # noqa: BLE001 -- one failed run must not lose the other rows
                        rows.append({"stage": stage, "workers": w, "data_loading": mode,
                                     "error": f"{type(e).__name__}: {str(e)[:500]}"})
                        print(f"{stage:8s} {w} worker(s) {mode:8s}: FAILED {type(e).__name__}: {str(e)[:300]}",
                              flush=True)
                        continue
                    wall = time.time() - t0
                    while len(baselines) < args.baseline_runs:
                        run_baseline()
                    base = baselines[0]
                    base_t = statistics.median(t for run in baselines for t in baseline_epochs(run))
                    ddp, ddp_error = None, None
                    if w > 1 and args.ddp_baseline:
                        try:
                            ddp = in_process(spec, tmp, f"{stage}-{w}-ddp-{mode}", distributed=True)
                            ddp_t = statistics.median(baseline_epochs(ddp))
                        except Exception as e:  # noqa: BLE001 -- the row's own figures still count
                            ddp_error = f"{type(e).__name__}: {str(e)[:300]}"
                            print(f"{stage:8s} {w} worker(s) plain DDP baseline FAILED: {ddp_error}", flush=True)
                    rank0 = store.get_json("workers/rank-0.json")
                    iv = _intervals(rank0["epoch_ends"])
                    if stage == "search":
                        recs = {json.loads(x)["epoch"]: json.loads(x)
                                for x in store.get_bytes("search_record.jsonl").decode().splitlines()}
                        used = {e: s for e, s in iv.items() if recs[e]["phase"] == "search" and e > 2}
                    else:
                        used = {e: s for e, s in iv.items() if e < args.retrain_epochs}
                    stage_t = statistics.median(used.values())
                    first_end = min(x["time"] for x in rank0["epoch_ends"])
                    row = {"stage": stage, "workers": w, "data_loading": mode, "cpus_per_worker": cpus,
                           "shared_memory_allreduce": args.shared_memory_allreduce,
                           "baseline_keep_freed_memory": args.baseline_keep_freed_memory,
                           "threads_per_worker": threads, "per_worker_batch": base["batch"],
                           "steps_per_epoch": base["steps"], "arch_steps_per_epoch": base.get("val_steps"),
                           "stage_epoch_s": round(stage_t, 3), "in_process_epoch_s": round(base_t, 3),
                           "ratio": round(stage_t / base_t, 3),
                           "stage_epoch_intervals_s": {str(k): round(v, 3) for k, v in sorted(iv.items())},
                           "in_process_epochs_s": [{str(k): round(v["seconds"], 3) for k, v in run["epochs"].items()}
                                                   for run in baselines],
                           "in_process_run_medians_s": [round(statistics.median(baseline_epochs(run)), 3)
                                                        for run in baselines],
                           "stage_wall_s": round(wall, 1), "start_to_first_epoch_end_s": round(first_end - t0, 1)}
                    if ddp_error is not None:
                        row["ddp_error"] = ddp_error
                    if ddp is not None:
                        row |= {"ddp_epoch_s": round(ddp_t, 3), "ratio_vs_ddp": round(stage_t / ddp_t, 3),
                                "ddp_epochs_s": {str(k): round(v["seconds"], 3) for k, v in ddp["epochs"].items()}}
                    if stage == "retrain":
                        # the training thread's CPU time against its wall time per epoch (the rest is waiting), its page faults
                        def split_of(epochs) -> dict:
                            used_e = [v for v in epochs if v.get("train_cpu_seconds") is not None]
                            faults = [v["train_page_faults"] for v in used_e if v.get("train_page_faults") is not None]
                            return {"train_s": round(statistics.median(v["train_seconds"] for v in used_e), 3),
                                    "train_cpu_s": round(statistics.median(v["train_cpu_seconds"] for v in used_e), 3),
                                    "page_faults": statistics.median(faults) if faults else None} if used_e else {}

                        row["train_loop_median"] = {
                            **{f"stage_rank{k}": split_of([x for x in store.get_json(f"workers/rank-{k}.json")["epoch_ends"]
                                                           if 1 < x["epoch"] < args.retrain_epochs]) for k in range(w)},
                            "in_process": split_of([v for run in baselines for e, v in run["epochs"].items() if e > 1]),
                            **({"plain_ddp_rank0": split_of([v for e, v in ddp["epochs"].items() if e > 1])}
                               if ddp is not None else {})}
                        print(f"  train loop (median wall / CPU s): {json.dumps(row['train_loop_median'])}", flush=True)
                    if prof is not None:
                        prof.join(timeout=args.profile_seconds + 120)
                        row["profile"] = prof.result
                        print(f"  profile: {json.dumps(prof.result)}", flush=True)
                    rows.append(row)
                    print(f"{stage:8s} {w} worker(s) {mode:8s}: stage epoch {stage_t:6.2f}s | in process "
                          f"{base_t:6.2f}s | ratio {stage_t / base_t:5.2f}"
                          + (f" | plain DDP {ddp_t:6.2f}s, ratio {stage_t / ddp_t:5.2f}" if ddp is not None else "")
                          + f" | intervals {row['stage_epoch_intervals_s']}"
                          f" | in-process {row['in_process_epochs_s']} | wall {wall:.1f}s", flush=True)
    finally:
        ray.shutdown()
    load_after = _uptime()
    print(f"uptime after: {load_after}", flush=True)
    result = {"command": "python bench/bench_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": describe_device("cpu").get("name") or platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__},
              "load_before": load_before, "load_after": load_after, "data": manifest["counts"],
              "search_settings": settings, "retrain": {"batch_size": r["batch_size"], "lr": r["lr"],
                                                       "epochs": args.retrain_epochs},
              "goal_ratio": 1.3, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
