"""One batch's training augmentation (``WorkerSplit.augment_batch``: crop boxes, crop + resize, flip,
normalisation) as the demo's retrain ranks make it: 32 uint8 28x28 grey images to 32x32, 1 torch thread."""
import statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from jobs.data import WorkerSplit, random_resized_boxes  # noqa: E402

torch.set_num_threads(1)
imgs = torch.randint(0, 255, (1000, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
ws = WorkerSplit(imgs, torch.zeros(1000, dtype=torch.int64), augment=True, input_size=32, channels=1, mean=[0.5],
                 std=[0.25])
g = torch.Generator().manual_seed(0)
idx = torch.randperm(1000, generator=g)[:32]


def median_ms(f, n=300):
    for _ in range(30):
        f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


print(f"augment_batch, batch 32: {median_ms(lambda: ws.augment_batch(ws.images[idx], g)):.3f} ms; "
      f"of which random_resized_boxes {median_ms(lambda: random_resized_boxes(32, 28, 28, ws.scale, g)):.3f} ms")
