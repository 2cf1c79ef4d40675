#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on a GPU machine that has PyTorch but no package index.
#   bash scripts/gpu_carry.sh [PYVER]     # PYVER: the GPU machine's Python, default 3.12
# Writes two git-ignored folders at the repository root (about 50 MB together), to copy with the tree:
#   .whl/      wheels for Ray and the pure-Python packages the stages import that such an image lacks.
#              Ray's wheel is repacked without its Java jars, RLlib, Serve, LLM and dashboard web build
#              (none is imported by the pipeline), which brings it from 79 to 42 MB.
#   .gpudata/  Fashion-MNIST in its idx.gz format: the first TRAIN_IMAGES training images and the
#              whole test set, for DENSENAS_FASHION_MNIST_DIR.
# gpu_check.sh installs .whl into /tmp/gpu-site when `import ray` fails, and uses .gpudata when present.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
TRAIN_IMAGES=${TRAIN_IMAGES:-12000}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p .whl .gpudata
for d in .whl .gpudata; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done

pin() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
RAW=$(mktemp -d)
download "$RAW" "ray==$(pin ray)"
download .whl "pydantic==$(pin pydantic)" "pydantic-core==$(pin pydantic-core)" "annotated-types==$(pin annotated-types)" \
  "typing-inspection==$(pin typing-inspection)" "typing-extensions==$(pin typing-extensions)" \
  "jsonschema==$(pin jsonschema)" "jsonschema-specifications==$(pin jsonschema-specifications)" \
  "referencing==$(pin referencing)" "rpds-py==$(pin rpds-py)"
"$PY" - "$RAW" .whl <<'EOF'
import sys, zipfile
from pathlib import Path
raw, out = Path(sys.argv[1]), Path(sys.argv[2])
drop = lambda n: n.startswith(("ray/jars/", "ray/rllib/", "ray/llm/", "ray/serve/", "ray/dashboard/client/build/")) \
    or n.endswith(".js.map")
for whl in raw.glob("ray-*.whl"):
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(out / whl.name, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            if drop(info.filename):
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):  # pip reads it: list only the files kept
                data = "".join(l + "\n" for l in data.decode().splitlines() if not drop(l.split(",")[0])).encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    print(f"{out / whl.name}: {(out / whl.name).stat().st_size / 1e6:.1f} MB (from {whl.stat().st_size / 1e6:.1f})")
EOF
rm -rf "$RAW"

SRC=${DENSENAS_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
"$PY" - "$SRC" .gpudata "$TRAIN_IMAGES" <<'EOF'
import gzip, shutil, struct, sys
from pathlib import Path
src, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for kind, per in (("images-idx3", 28 * 28), ("labels-idx1", 1)):
    raw = gzip.decompress((src / f"train-{kind}-ubyte.gz").read_bytes())
    dims = raw[3]
    head = bytearray(raw[:4 + 4 * dims])
    total = struct.unpack(">I", raw[4:8])[0]
    keep = min(n, total)
    head[4:8] = struct.pack(">I", keep)  # the idx header's item count
    (out / f"train-{kind}-ubyte.gz").write_bytes(gzip.compress(bytes(head) + raw[4 + 4 * dims:][:keep * per]))
    shutil.copy(src / f"t10k-{kind}-ubyte.gz", out / f"t10k-{kind}-ubyte.gz")
print(f"{out}: Fashion-MNIST, first {keep} of {total} training images, the whole test set")
EOF
du -sh .whl .gpudata
