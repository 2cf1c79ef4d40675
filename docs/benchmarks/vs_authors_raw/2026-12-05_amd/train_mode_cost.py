"""What ``net.train()`` costs on the ImageNet super network against reading every module's flag."""
import sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from densenas.supernet import SuperNet  # noqa: E402

net = SuperNet("imagenet_mbconv", 100)
mods = tuple(net.modules())
for _ in range(3):
    net.train()
t = time.perf_counter()
for _ in range(20):
    net.train()
train_ms = (time.perf_counter() - t) / 20 * 1e3
t = time.perf_counter()
for _ in range(20):
    all(m.training for m in mods)
flags_ms = (time.perf_counter() - t) / 20 * 1e3
print(f"{len(mods)} modules: net.train() {train_ms:.1f} ms per call; all(m.training) {flags_ms:.2f} ms")
