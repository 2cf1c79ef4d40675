"""Probe: where plain 2-rank DDP loses time against one rank alone (retrain, tiny config)."""
import json, os, socket, statistics, subprocess, sys, tempfile, time
from pathlib import Path
REPO = Path(__file__).resolve().parents[4]   # the repository root
sys.path.insert(0, str(REPO))


def child(spec_path, out_path):
    import torch, torch.distributed as dist
    from cluster.storage import open_store
    from densenas.arch import load_arch, build_model
    from densenas.retrain import build_optimizer, build_scheduler, train_epoch
    from jobs.data import load_worker_split, stream_seed
    from jobs.train import steps_per_worker
    from jobs.retrain import RetrainConfig
    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ.get("RANK", "0")), spec["workers"]
    if os.environ.get("PIN"):
        os.sched_setaffinity(0, {rank})
    torch.set_num_threads(1)
    if os.environ.get("MALLOPT"):
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        print("mallopt", libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024), libc.mallopt(M_TRIM_THRESHOLD, 1 << 30), libc.mallopt(M_TOP_PAD, 64 << 20))
    mode = spec["mode"]
    if mode.startswith("ddp") or mode.startswith("flat") or mode.startswith("real"):
        dist.init_process_group("gloo", rank=rank, world_size=world)
    rcfg = RetrainConfig.model_validate(spec["retrain"])
    arch = load_arch(spec["arch"]); manifest = spec["manifest"]
    counts = manifest["counts"]
    batch, steps = steps_per_worker(int(counts["train"]) + int(counts["val"]), world, rcfg.batch_size)
    data = load_worker_split(manifest, ["train", "val"], open_store(spec["split_root"]), rank=rank, world=world,
                             augment=True, input_size=arch.input_size, channels=arch.in_channels)
    torch.manual_seed(rcfg.seed)
    model = build_model(arch, num_classes=int(manifest["num_classes"]), dropout=rcfg.dropout)
    opt = build_optimizer(model, rcfg); sched = build_scheduler(opt, rcfg, steps)
    kw = {}
    if mode == "ddp_small_buckets": kw = {"bucket_cap_mb": 0.02}
    if mode == "ddp_nohook": kw = {"bucket_cap_mb": 1000}
    if mode == "ddp_view": kw = {"gradient_as_bucket_view": True, "static_graph": True}
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False, **kw) if mode.startswith("ddp") else model
    out = {}
    for e in range(spec["epochs"]):
        b = data.batches(batch, stream_seed(rcfg.seed, e, rank, "train"), shuffle=True, drop_last=True)
        if not mode.endswith("_aug"):
            b = list(b)[:steps]
        if mode.startswith("ddp") or mode.startswith("flat") or mode.startswith("real"): dist.barrier()
        t0 = time.perf_counter()
        from jobs.train import allreduce_mean
        def spin_mean(tensors):
            flat = torch.cat([t.reshape(-1) for t in tensors])
            w = dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)
            t_end = time.perf_counter() + 0.05
            while not w.is_completed() and time.perf_counter() < t_end:
                os.sched_yield()
            w.wait()
            flat /= 2
            torch._utils._unflatten_dense_tensors  # noqa
            off = 0
            for t in tensors:
                n = t.numel(); t.copy_(flat[off:off + n].view_as(t)); off += n
        gs = {"flat": allreduce_mean, "flatspin": spin_mean, "flatspin_aug": spin_mean, "real": allreduce_mean, "real_aug": allreduce_mean}.get(mode)
        train_epoch(net, b, opt, sched, rcfg, "cpu", grad_sync=gs)
        out[e + 1] = time.perf_counter() - t0
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out.setdefault("flt", []).append(ru.ru_minflt)
    Path(out_path + f".{rank}").write_text(json.dumps(out))

def run(spec, tmp, mode, pin=False):
    spec = spec | {"mode": mode}
    sp = tmp / f"{mode}.json"; sp.write_text(json.dumps(spec)); op = str(tmp / f"{mode}-out")
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if pin: env["PIN"] = "1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    n = 1 if mode == "alone" else 2
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(sp), op], env=env | {"RANK": str(r)}, cwd=str(REPO)) for r in range(n)]
    assert all(p.wait() == 0 for p in procs)
    res = {r: json.loads(Path(op + f".{r}").read_text()) for r in range(n)}
    flt = res[0].pop("flt")
    print("   minflt per epoch", [b - a for a, b in zip(flt, flt[1:])])
    med = statistics.median(v for k, v in res[0].items() if int(k) > 1)
    return med, res

def main():
    import yaml
    from cluster.storage import open_store
    from densenas.arch import load_arch
    from densenas.derive import derive
    from densenas.space import load_space
    from densenas.supernet import SuperNet
    from jobs import split
    from jobs.context import StageContext
    from jobs.retrain import RetrainConfig
    from jobs.split import SplitConfig
    import torch
    tiny = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="ddp-probe-"))
    d = tiny["data"]
    so = split.run(SplitConfig(classes=d["classes"], max_per_class=d["max_per_class"], val_fraction=d["val_fraction"],
                               test_max_per_class=d["test_max_per_class"], shard_size=d["shard_size"], seed=d["seed"],
                               executor="local"), None, StageContext.standalone(open_store(str(tmp / "split"))))
    space = load_space(tiny["space"]); torch.manual_seed(0)
    arch = load_arch(derive(SuperNet(space, num_classes=int(so.num_classes))).arch.to_json())
    r = tiny["retrain"]; epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    spec = {"split_root": str(tmp / "split"), "manifest": so.model_dump(mode="json"), "workers": 2, "epochs": epochs,
            "arch": arch.to_json(), "retrain": RetrainConfig(epochs=epochs, batch_size=r["batch_size"], lr=r["lr"], workers=2,
                                                            cpus_per_worker=1, measure_latency=False, export=False).model_dump(mode="json")}
    modes = sys.argv[1].split(",")
    out = []
    for rep in range(2):
        for m in modes:
            pin = m.endswith("+pin"); mm = m.removesuffix("+pin")
            med, res = run(spec, tmp, mm, pin)
            out.append({"rep": rep, "mode": m, "median_epoch_s": round(med, 3), "epochs": res})
            print(f"rep {rep} {m:24s} median epoch {med:.3f} s  rank0 {[round(v,2) for v in res[0].values()]}", flush=True)
    print(json.dumps(out))

if __name__ == "__main__":
    if sys.argv[1] == "--child": child(sys.argv[2], sys.argv[3])
    else: main()
