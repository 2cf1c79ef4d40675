"""Does depth pay in tiny_mbconv at full Fashion-MNIST scale? (issue 13 diagnostic, on a lent GPU)

The uniform random nets of depth.py (same space, same seed, same draw) retrained on every training
image for many epochs, tested on the whole 10k test set; prints each net's top-1 and
Spearman(path length / params, top-1). Images: the evaluation transform (resize, centre crop,
normalise) with random horizontal flips, as bench_quality's retrain; recipe: the sweep's retrain
recipe with the batch, learning rate and epochs given here.

    python depth_gpu.py OUT_JSON N_NETS EPOCHS BATCH LR [TRAIN_IMAGES]
"""
import json, random, statistics, sys, time
from pathlib import Path
REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
import torch
import imagedata as D
from bench.bench_quality import uniform_random_nets
from bench.bench_sweep import spearman
from densenas.arch import build_model
from densenas.retrain import build_optimizer, build_scheduler, evaluate, train_epoch
from pipeline.config import load_config, resolve_space

out, n_nets, epochs, batch, lr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
n_train = int(sys.argv[6]) if len(sys.argv) > 6 else None
dev = "cuda" if torch.cuda.is_available() else "cpu"
cfg = load_config(str(REPO / "configs/sweep_tiny.yaml"), check=False)
space = resolve_space(cfg.space)
data = D.load_embedded("fashion_mnist")
tf = D.eval_transform(space.input_size, space.in_channels, data.name)


def tensors(x, y):
    x = torch.as_tensor(x)[:, None] if torch.as_tensor(x).dim() == 3 else torch.as_tensor(x)
    xs = [tf(x[i:i + 4096]) for i in range(0, len(x), 4096)]
    return torch.cat(xs).to(dev), torch.as_tensor(y).long().to(dev)


tx, ty = tensors(data.train_images[:n_train], data.train_labels[:n_train])
vx, vy = tensors(data.test_images, data.test_labels)
print(f"{data.name}: train {len(ty)}, test {len(vy)}, input {tuple(tx.shape[1:])}, device {dev} "
      f"({torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu'})", flush=True)
nets = uniform_random_nets(space, 10, n_nets, random.Random(7))
recipe = cfg.sweep.train_recipe().model_copy(update={"epochs": epochs, "batch_size": batch, "lr": lr})
rows = []
for k, c in enumerate(nets):
    arch = c["arch"]
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, dropout=recipe.dropout).to(dev)
    params = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, recipe)
    steps = len(ty) // batch
    sched = build_scheduler(opt, recipe, steps)
    g = torch.Generator(device=dev).manual_seed(0)

    def batches():
        order = torch.randperm(len(ty), generator=g, device=dev)
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            flip = torch.rand(len(idx), generator=g, device=dev) < 0.5
            yield torch.where(flip[:, None, None, None], tx[idx].flip(-1), tx[idx]), ty[idx]

    t0 = time.time()
    curve = []
    for e in range(epochs):
        r = train_epoch(model, batches(), opt, sched, recipe, dev)
        curve.append(round(r["acc"], 4))
    res = evaluate(model, ((vx[i:i + 2000], vy[i:i + 2000]) for i in range(0, len(vy), 2000)), dev)
    rows.append({"one_line": arch.one_line(), "path": c["path"], "path_len": len(c["path"]), "params": params,
                 "top1": res["top1"], "train_acc_by_epoch": curve, "seconds": round(time.time() - t0, 1)})
    print(f"{k:2d} len {len(c['path'])} params {params:6d} top1 {res['top1']:.4f} train {curve[-1]:.4f} "
          f"({rows[-1]['seconds']:.0f}s) {arch.one_line()}", flush=True)
    Path(out).write_text(json.dumps({"argv": sys.argv[1:], "device": dev, "recipe": recipe.model_dump(),
                                     "train_images": len(ty), "test_images": len(vy), "rows": rows}, indent=1))
top = [r["top1"] for r in rows]
print("spearman(path length, top1) =", round(spearman([r["path_len"] for r in rows], top), 3),
      "spearman(params, top1) =", round(spearman([r["params"] for r in rows], top), 3))
for n in sorted({r["path_len"] for r in rows}):
    t = [r["top1"] for r in rows if r["path_len"] == n]
    print(f"path length {n}: {len(t)} nets, mean top-1 {statistics.mean(t):.4f}")
