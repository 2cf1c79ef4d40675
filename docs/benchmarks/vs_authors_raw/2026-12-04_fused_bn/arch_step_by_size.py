import sys, time, torch, json
sys.path.insert(0, "/work/main")
torch.set_num_threads(int(sys.argv[1]))
from bench.bench_vs_authors import build_ours, _batch
step, build, counts = build_ours("arch", 8)
x, y = _batch(224, 8)
for _ in range(2): step(x, y)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
    for _ in range(2): step(x, y)
ka = p.key_averages()
d = {k.key: k.self_cpu_time_total/1e3 for k in ka}
# by spatial size
kb = p.key_averages(group_by_input_shape=True)
bysz = {}
for k in kb:
    if k.input_shapes and k.input_shapes[0] and len(k.input_shapes[0])==4:
        hw = k.input_shapes[0][2]
        bysz[hw] = bysz.get(hw,0)+k.self_cpu_time_total/1e3
json.dump({"ops": d, "hw": bysz}, open(f"/tmp/s26/scal{sys.argv[1]}.json","w"))
