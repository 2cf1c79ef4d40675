"""Probe: one rank's retrain epoch (per-rank work of 2 workers) under variants, in plain processes.
usage: probe.py setup DIR | probe.py run DIR VARIANT OUT"""
import json, os, sys, tempfile, time, threading, statistics
from pathlib import Path
sys.path.insert(0, "/work/main")
import torch

def setup(d):
    from bench.bench_overhead import _tiny
    from cluster.storage import open_store
    from densenas.derive import derive
    from densenas.space import load_space
    from densenas.supernet import SuperNet
    from jobs import split
    from jobs.context import StageContext
    from jobs.split import SplitConfig
    tiny = _tiny(); dd = tiny["data"]
    store = open_store(str(Path(d) / "split"))
    out = split.run(SplitConfig(classes=dd["classes"], max_per_class=dd["max_per_class"], val_fraction=dd["val_fraction"],
                                test_max_per_class=dd["test_max_per_class"], shard_size=dd["shard_size"], seed=dd["seed"],
                                executor="local"), None, StageContext.standalone(store))
    torch.manual_seed(0)
    arch = derive(SuperNet(load_space(tiny["space"]), num_classes=int(out.model_dump()["num_classes"]))).arch
    (Path(d) / "spec.json").write_text(json.dumps({"manifest": out.model_dump(mode="json"), "arch": arch.to_json(),
                                                   "retrain": tiny["retrain"]}))

def run(d, variant, out_path, epochs=8):
    from cluster.storage import open_store
    from densenas.arch import build_model, load_arch
    from densenas.retrain import build_optimizer, build_scheduler, train_epoch
    from jobs.data import load_worker_split, stream_seed
    from jobs.retrain import RetrainConfig
    from jobs.train import steps_per_worker
    spec = json.loads((Path(d) / "spec.json").read_text())
    r = spec["retrain"]
    rcfg = RetrainConfig(epochs=epochs, batch_size=r["batch_size"], lr=r["lr"], workers=2, cpus_per_worker=1,
                         max_failures=0, measure_latency=False, export=False)
    torch.set_num_threads(1)
    manifest, arch = spec["manifest"], load_arch(spec["arch"])
    counts = manifest["counts"]; rank = int(os.environ.get("PROBE_RANK", "0"))
    batch, steps = steps_per_worker(int(counts["train"]) + int(counts["val"]), 2, rcfg.batch_size)
    data = load_worker_split(manifest, ["train", "val"], open_store(str(Path(d) / "split")), rank=rank, world=2,
                             augment=True, input_size=arch.input_size, channels=arch.in_channels)
    torch.manual_seed(rcfg.seed)
    model = build_model(arch, num_classes=int(manifest["num_classes"]), dropout=rcfg.dropout)
    opt = build_optimizer(model, rcfg); sched = build_scheduler(opt, rcfg, steps)
    res = {}
    def body():
        for e in range(epochs):
            gen = data.batches(batch, stream_seed(rcfg.seed, e, rank, "train"), shuffle=True, drop_last=True)
            b = gen if "lazy" in variant else list(gen)
            import resource
            f0 = resource.getrusage(resource.RUSAGE_THREAD); t0 = time.perf_counter(); c0 = time.thread_time()
            x = train_epoch(model, b, opt, sched, rcfg, "cpu", max_steps=steps)
            f1 = resource.getrusage(resource.RUSAGE_THREAD)
            res[e] = (time.perf_counter() - t0, time.thread_time() - c0, f1.ru_minflt - f0.ru_minflt, round(f1.ru_stime - f0.ru_stime, 3))
    if "thread" in variant:
        t = threading.Thread(target=body); t.start(); t.join()
    else:
        body()
    v = [res[e][0] for e in res if e > 0]
    Path(out_path).write_text(json.dumps({"variant": variant, "median_s": statistics.median(v), "epochs": res}))
    print(variant, os.getpid(), f"median {statistics.median(v):.3f}", [round(res[e][0], 3) for e in res], "faults", [res[e][2] for e in res], "stime", [res[e][3] for e in res], flush=True)

if __name__ == "__main__":
    if sys.argv[1] == "setup": setup(sys.argv[2])
    else: run(sys.argv[2], sys.argv[3], sys.argv[4])
