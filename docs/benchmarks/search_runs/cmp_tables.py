import json, sys, torch
from densenas.search import Searcher, SearchRunConfig
from densenas.supernet import SuperNet
from densenas.space import load_space
from densenas.latency import LatencyTable, ExpectedLatency
runs = {}
for name, yml, d in (("A", sys.argv[1], sys.argv[2]), ("B", sys.argv[3], sys.argv[4])):
    cfg = SearchRunConfig.from_yaml(yml)
    st = torch.load(f"{d}/search_state.pt", weights_only=False)
    s = Searcher(SuperNet(load_space(cfg.space), st["num_classes"]), cfg.search, steps_per_epoch=st["steps_per_epoch"], log=None)
    s.load_state_dict(st)
    runs[name] = (s, s.derive())
tables = {"A": LatencyTable.from_json(sys.argv[5]), "B": LatencyTable.from_json(sys.argv[6])}
net = runs["A"][0].net
out = {}
for name, (s, d) in runs.items():
    out[name] = {"path": d.path, "official": d.official, "path_prob": d.path_prob,
                 "cost_under": {t: ExpectedLatency(net, tab).path_cost(d.path, d.op_choice) for t, tab in tables.items()}}
sa, sb = runs["A"][0], runs["B"][0]
on_path = lambda s, d: [k for k, m in enumerate(s.net.mixed_ops) if (m.kind == "head" and tuple(m.edge) in set(zip(d.path, d.path[1:]))) or (m.kind == "stack" and m.block in d.path)]
da, db = runs["A"][1], runs["B"][1]
out["same_path"] = da.path == db.path
out["same_ops_all_layers"] = sum(a == b for a, b in zip(da.op_choice, db.op_choice)) / len(da.op_choice)
out["max_abs_alpha_diff"] = max(float((a - b).abs().max()) for a, b in zip(sa.alphas, sb.alphas))
out["max_abs_beta_diff"] = max(float((a - b).abs().max()) for a, b in zip(sa.betas, sb.betas))
r = [tables["B"].lookup(k) / tables["A"].lookup(k) for k in tables["A"].entries]
import statistics
out["table_ratio_B_over_A"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
print(json.dumps(out, indent=1))
