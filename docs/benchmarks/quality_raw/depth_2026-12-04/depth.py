"""Does depth pay in tiny_mbconv when the retrain gets more data and epochs? (issue 13 diagnostic)

The same uniform random nets of the space retrained with the bench's recipe (the sweep's retrain recipe:
3 epochs on 1,000 images) and with a larger one (more images and epochs), each tested on the same
held-out Fashion-MNIST images; prints Spearman(params, top-1) and Spearman(path length, top-1) per recipe.

    python depth.py OUT_DIR N_RANDOM BIG_IMAGES BIG_EPOCHS      # as run: /tmp/s26/depth 10 6000 4
"""
import json, random, sys, time
sys.path.insert(0, "/work/main")
import torch
torch.set_num_threads(1)
from bench.bench_quality import retrain, uniform_random_nets
from bench.bench_sweep import load_tensors, spearman
from cluster.storage import open_store
from jobs import split as split_stage
from jobs.context import StageContext
from pipeline.config import load_config, resolve_space

out = sys.argv[1]; n_random = int(sys.argv[2]); big_imgs = int(sys.argv[3]); big_epochs = int(sys.argv[4])
cfg = load_config("/work/main/configs/sweep_tiny.yaml", check=False)
space = resolve_space(cfg.space)
store = open_store(out + "/split")
data_cfg = cfg.data.model_copy(update={"executor": "local", "max_per_class": big_imgs // 10 + 25,
                                       "val_fraction": 0.05, "test_max_per_class": 300})
m = split_stage.run(data_cfg, None, StageContext.standalone(store)).model_dump()
tr = load_tensors(m, store, "train", space); te = load_tensors(m, store, "test", space)
print("train", len(tr[1]), "test", len(te[1]), flush=True)
nets = uniform_random_nets(space, 10, n_random, random.Random(7))
recipe0 = cfg.sweep.train_recipe()
small = (tr[0][:1000], tr[1][:1000])
big = (tr[0][:big_imgs], tr[1][:big_imgs])
rows = []
for k, c in enumerate(nets):
    arch = c["arch"]
    from densenas.arch import build_model
    params = sum(p.numel() for p in build_model(arch, num_classes=10).parameters())
    t = time.time(); a_small, _ = retrain(arch, small, te, 10, recipe0, 0); ts = time.time() - t
    t = time.time(); a_big, _ = retrain(arch, big, te, 10, recipe0.model_copy(update={"epochs": big_epochs}), 0); tb = time.time() - t
    rows.append({"one_line": arch.one_line(), "path": c["path"], "params": params, "small": a_small, "big": a_big})
    print(f"{k:2d} len {len(c['path'])} params {params:6d} small {a_small:.4f} ({ts:.0f}s) big {a_big:.4f} ({tb:.0f}s) {arch.one_line()}", flush=True)
json.dump(rows, open(out + "/depth.json", "w"), indent=1)
for key in ("small", "big"):
    print(key, "spearman(params, top1) =", round(spearman([r["params"] for r in rows], [r[key] for r in rows]), 3),
          "spearman(path length, top1) =", round(spearman([len(r["path"]) for r in rows], [r[key] for r in rows]), 3))
