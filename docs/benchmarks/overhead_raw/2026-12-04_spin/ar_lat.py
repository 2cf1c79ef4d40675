import os, sys, time, socket, subprocess, statistics, json
def child():
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"]); dist.init_process_group("gloo", rank=rank, world_size=2)
    out = {}
    for n in (16, 59000, 240000):
        t = torch.randn(n)
        for _ in range(20): dist.all_reduce(t)
        ts = []
        for _ in range(300):
            t0 = time.perf_counter(); dist.all_reduce(t); ts.append(time.perf_counter() - t0)
        out[n] = {"median_ms": statistics.median(ts) * 1e3, "p90_ms": sorted(ts)[270] * 1e3}
    # with compute in between (both ranks busy ~30 ms of matmul between collectives)
    a = torch.randn(400, 400); t = torch.randn(59000); ts = []
    for _ in range(100):
        for _ in range(60): a @ a
        t0 = time.perf_counter(); dist.all_reduce(t); ts.append(time.perf_counter() - t0)
    out["busy_59000"] = {"median_ms": statistics.median(ts) * 1e3, "p90_ms": sorted(ts)[90] * 1e3}
    def spin_ar(t):
        w = dist.all_reduce(t, async_op=True)
        while not w.is_completed():
            os.sched_yield()
        w.wait()
    for n in (59000,):
        t = torch.randn(n); ts = []
        for _ in range(300):
            t0 = time.perf_counter(); spin_ar(t); ts.append(time.perf_counter() - t0)
        out[f"spin_{n}"] = {"median_ms": statistics.median(ts) * 1e3, "p90_ms": sorted(ts)[270] * 1e3}
    ts = []
    for _ in range(100):
        for _ in range(60): a @ a
        t0 = time.perf_counter(); spin_ar(t); ts.append(time.perf_counter() - t0)
    out["spin_busy_59000"] = {"median_ms": statistics.median(ts) * 1e3, "p90_ms": sorted(ts)[90] * 1e3}
    ts = []
    for _ in range(100):
        t1 = time.perf_counter()
        for _ in range(60): a @ a
        ts.append(time.perf_counter() - t1)
    out["compute_only_ms"] = {"median_ms": statistics.median(ts) * 1e3, "p90_ms": sorted(ts)[90] * 1e3}
    if rank == 0: print(json.dumps(out, indent=1))
if sys.argv[1:] == ["child"]: child()
else:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    ps = [subprocess.Popen([sys.executable, __file__, "child"], env=env | {"RANK": str(r)}) for r in range(2)]
    [p.wait() for p in ps]
