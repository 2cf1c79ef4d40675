"""Re-derive target-mode runs from their saved search state with the current derive code."""
import json, sys, torch
from densenas.search import Searcher, SearchRunConfig
from densenas.supernet import SuperNet
from densenas.space import load_space
out = {}
for yml, d in zip(sys.argv[1::2], sys.argv[2::2]):
    cfg = SearchRunConfig.from_yaml(yml)
    state = torch.load(f"{d}/search_state.pt", weights_only=False)
    s = Searcher(SuperNet(load_space(cfg.space), state["num_classes"]), cfg.search,
                 steps_per_epoch=state["steps_per_epoch"], log=None)
    s.load_state_dict(state)
    der = s.derive()
    free = s.derived_cost()
    t = cfg.search.target_latency
    out[yml] = {"target": t, "derived_cost": der.predicted_cost, "rel_error": der.predicted_cost / t - 1 if t else None,
                "path": der.path, "path_prob": der.path_prob, "notes": der.notes, "viterbi_argmax_cost": free,
                "lambda_end": s.lam, "arch_steps": s.arch_step_count, "official": der.official}
    print(json.dumps(out[yml]))
