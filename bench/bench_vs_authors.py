"""Search steps side by side with the authors' code (JaminFong/DenseNAS): writes docs/benchmarks/vs_authors.{md,json}.

Issue 14, item 4. Goal: our weight step and our architecture step >= 1.5x faster than the authors'
on all four rows (weight / arch step x {224x224 batch 8, 64x64 batch 32}; MBConv ImageNet search
space, 100 classes, 2 torch threads), with a lower peak RSS on each.

How it measures (no constants from another day):

- **Speed**: for each row, ONE subprocess builds both super networks (ours: ``densenas.supernet.SuperNet``
  with ``densenas.search.Searcher``; theirs: their ``models/search_space_mbv2.Network`` built from their
  ``configs/imagenet_search_cfg_mbv2.yaml``, wrapped in ``nn.DataParallel`` as in their
  ``run_apis/search.py``, stepped by their ``run_apis/optimizer.Optimizer`` with their
  ``tools/lr_scheduler`` and their latency list), then alternates the two codes step by step (order
  alternating: ours-theirs, theirs-ours, ...), N warm-up then M timed steps each. Both see the same load;
  the speed-up is the ratio of medians (theirs / ours).
- **Peak RSS**: one process cannot tell the two sides' peaks apart, so each side also runs the same
  steps alone in its own subprocess per row (importing only its own code); its peak RSS is that
  process's ``VmHWM`` (its own high-water mark; ``ru_maxrss`` would carry the driver's over exec). These solo times are recorded in the JSON
  but the verdict uses the interleaved ones.

The authors' code is imported at run time from ``--authors`` (default
/work/.mirror/JaminFong+DenseNAS/repo), never copied into this repository. A checkout whose work tree is
absent (only ``.git``) is exported with ``git archive`` to a cache directory outside the repository
(``--authors-cache``). Their files are not edited: in the benchmark's own subprocesses only,
``torch.Tensor.cuda`` and ``nn.Module.cuda`` become no-ops (CPU), ``yaml.load`` gets a ``Loader``
(PyYAML >= 6) while their config is read, and during their ``Optimizer.rescale_arch_params`` a 0-dim
``scatter_`` source is broadcast to the index (current PyTorch rejects a 0-dim source for a 2-element
index; broadcast, both sampled ops get the eq. 9 shift that their code computes); their latency list is read with ``ast.literal_eval`` (same value as their ``eval``).

Same hyper-parameters on both sides (checked against their config at run time): SGD lr 0.2, momentum
0.9, weight decay 4e-5; Adam lr 3e-4 (alpha and beta), betas (0.5, 0.999), weight decay 1e-3;
lambda 0.15, tau 15. Their weight step: one op sampled per mixed op (softmax(alpha), search stage 1),
every edge active, CE, fwd + bwd + SGD, preceded by their scheduler step; arch parameters frozen
(``set_param_grad_state('Weights')``). Their arch step: two ops sampled, CE + lambda ln(lat)/ln(tau),
Adam, re-balance; weights frozen (``set_param_grad_state('Arch')``), as their search loop does.
With PyTorch >= 2 ``zero_grad`` sets gradients to None on both sides, so SGD momentum / weight decay
touch only the sampled ops in both (the authors' PyTorch 1.0 decayed every weight every step).
Ours costs ops with its MACs model, theirs with their latency list: the cost values differ, the
computation of the latency term does not depend on them.

    python bench/bench_vs_authors.py                        # the full run: 4 rows, 2 warm-up + 9 timed steps
    python bench/bench_vs_authors.py --sizes 64 --batch 2 --steps 1 --out /tmp/vs   # smoke run
    python bench/bench_vs_authors.py --authors /path/to/DenseNAS   # another checkout

Full run (the first command) on a quiet 2-core machine: about 7-10 minutes (12 processes; per row 22
steps of each code plus 4 super-network builds). Peak memory about 10 GB: the 224x224 batch 8
arch-step row's interleaved process holds both super networks (the authors' alone peaked at 5.1 GB
there before); every other process stays below that.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_AUTHORS = "/work/.mirror/JaminFong+DenseNAS/repo"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "densenas_bench_authors"
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "vs_authors"
DEFAULT_BATCH = {224: 8, 64: 32}
GOAL_SPEEDUP = 1.5
CLASSES = 100
# The paper's search hyper-parameters; ours are built from these and theirs are checked against them.
HYPER = {"lr": 0.2, "momentum": 0.9, "weight_decay": 4e-5, "arch_lr": 3e-4, "arch_betas": (0.5, 0.999),
         "arch_weight_decay": 1e-3, "lambda": 0.15, "tau": 15.0}
# What the benchmark imports from their checkout.
AUTHORS_FILES = ("models/dropped_model.py", "models/search_space_mbv2.py", "models/search_space_base.py",
                 "models/operations.py", "configs/imagenet_search_cfg_mbv2.yaml", "configs/search_config.py",
                 "configs/imagenet_train_cfg.py", "run_apis/optimizer.py", "tools/config_yaml.py",
                 "tools/lr_scheduler.py", "latency_list/lat_list_densenas_mbv2_xp32")
AUTHORS_CONFIG = "configs/imagenet_search_cfg_mbv2.yaml"


class AuthorsCodeMissing(Exception):
    pass


# --------------------------------------------------------------------------- the authors' checkout
def _git(args: list[str], git_dir: Path) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _git_dir(path: Path) -> Path | None:
    if (path / ".git").exists():
        return path / ".git"
    if (path / "HEAD").is_file() and (path / "objects").is_dir():  # a bare repository
        return path
    return None


def resolve_authors(path: str | Path, cache: Path) -> dict:
    """The directory to import the authors' code from, and where it came from.

    A checkout with its files is used as is; a git checkout without a work tree (or a bare one) is
    exported (``git archive`` of its HEAD) once to ``cache/<commit>``, outside this repository."""
    path = Path(path).expanduser()
    hint = (f"clone it there (git clone https://github.com/JaminFong/DenseNAS {path}) or pass "
            "--authors PATH to a checkout")
    if not path.exists():
        raise AuthorsCodeMissing(f"bench_vs_authors: the authors' DenseNAS code (JaminFong/DenseNAS) is absent: "
                                 f"{path} does not exist; {hint}")
    git_dir = _git_dir(path)
    commit = None
    if git_dir is not None:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            commit = _git(["rev-parse", "HEAD"], git_dir)
    missing = [f for f in AUTHORS_FILES if not (path / f).is_file()]
    if not missing:
        return {"tree": str(path), "source": str(path), "commit": commit, "exported": False}
    if git_dir is None or commit is None:
        raise AuthorsCodeMissing(f"bench_vs_authors: the authors' DenseNAS code is absent at {path}: missing "
                                 f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} and no git "
                                 f"history to export them from; {hint}")
    tree = cache / commit
    if not all((tree / f).is_file() for f in AUTHORS_FILES):
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{commit[:12]}-", dir=cache))
        try:
            archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "--format=tar", commit],
                                     check=True, capture_output=True).stdout
            with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
                tar.extractall(tmp, filter="data")
            absent = [f for f in AUTHORS_FILES if not (tmp / f).is_file()]
            if absent:
                raise AuthorsCodeMissing(f"bench_vs_authors: {path} at {commit} lacks {', '.join(absent)}; "
                                         f"is it JaminFong/DenseNAS? {hint}")
            shutil.rmtree(tree, ignore_errors=True)
            tmp.rename(tree)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"tree": str(tree), "source": str(path), "commit": commit, "exported": True}


# --------------------------------------------------------------------------- the two sides (in a child)
def _rss_gib() -> float:
    """This process image's peak RSS: ``VmHWM`` (Linux). Not ``ru_maxrss``: a child started with
    vfork + exec inherits the parent's high-water mark there (the driver's ~0.5 GiB would be a floor)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # other systems: KiB on Linux/BSD


def _patch_for_cpu() -> None:
    """The authors' code calls .cuda() on tensors and modules: no-ops here (this process only)."""
    import torch
    from torch import nn

    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]


@contextlib.contextmanager
def _yaml_loader():
    """PyYAML >= 6 requires yaml.load's Loader, which their tools/config_yaml.py does not pass."""
    import yaml

    original = yaml.load

    def load(stream, Loader=None, **kw):  # noqa: N803 - PyYAML's spelling
        return original(stream, Loader=Loader or yaml.SafeLoader, **kw)

    yaml.load = load
    try:
        yield
    finally:
        yaml.load = original


def _patch_rescale(optimizer_cls) -> None:
    """Their ``Optimizer.rescale_arch_params`` scatters a 0-dim tensor (``zeros.scatter_(0, index, value)``)
    over a 2-element index; current PyTorch requires ``src`` at least as large as ``index`` and raises.
    For the duration of their call only (their code is not edited), a 0-dim ``src`` is broadcast to
    ``index``'s shape: both sampled ops get the shift their code computes (the paper's eq. 9)."""
    import torch

    original = optimizer_cls.rescale_arch_params
    if getattr(original, "_bench_patched", False):
        return
    tensor_scatter = torch.Tensor.scatter_

    def scatter_(self, dim, index, src=None, **kw):
        if isinstance(src, torch.Tensor) and src.dim() == 0:
            src = src.expand(index.shape)
        return tensor_scatter(self, dim, index, **kw) if src is None else tensor_scatter(self, dim, index, src, **kw)

    def rescale_arch_params(self, *args, **kwargs):
        torch.Tensor.scatter_ = scatter_  # type: ignore[method-assign]
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.scatter_ = tensor_scatter  # type: ignore[method-assign]

    rescale_arch_params._bench_patched = True  # type: ignore[attr-defined]
    optimizer_cls.rescale_arch_params = rescale_arch_params


def build_theirs(tree: str, kind: str, batch: int):
    """Their super network, optimizer and scheduler as run_apis/search.py sets them up; a step closure."""
    import torch
    from torch import nn

    _patch_for_cpu()
    sys.path.insert(0, tree)
    from configs.imagenet_train_cfg import cfg
    from configs.search_config import search_cfg
    from models.search_space_mbv2 import Network
    from run_apis.optimizer import Optimizer
    from tools.config_yaml import merge_cfg_from_file, update_cfg_from_cfg
    from tools.lr_scheduler import get_lr_scheduler
    import models
    import run_apis

    for mod in (models, run_apis):
        if not str(Path(mod.__file__).resolve()).startswith(str(Path(tree).resolve())):
            raise RuntimeError(f"imported {mod.__name__} from {mod.__file__}, not from the authors' tree {tree}")
    _patch_rescale(Optimizer)
    update_cfg_from_cfg(search_cfg, cfg)
    with _yaml_loader():
        merge_cfg_from_file(str(Path(tree) / AUTHORS_CONFIG), cfg)
    config = cfg
    torch.manual_seed(0)
    t = time.perf_counter()
    super_model = nn.DataParallel(Network(config.optim.init_dim, config.data.dataset, config))
    with open(Path(tree) / "latency_list" / config.optim.sub_obj.latency_list_path) as f:
        super_model.module.sub_obj_list = ast.literal_eval(f.readline())
    criterion = nn.CrossEntropyLoss()
    search_optim = Optimizer(super_model, criterion, config)
    scheduler = get_lr_scheduler(config, search_optim.weight_optimizer, num_examples=100 * config.data.batch_size)
    build = time.perf_counter() - t
    # Same hyper-parameters as ours, from their config and their optimizer (fail loudly if not).
    adam = search_optim.arch_optimizer
    theirs = {"lr": config.optim.weight.init_lr, "momentum": config.optim.weight.momentum,
              "weight_decay": config.optim.weight.weight_decay, "arch_lr": config.optim.arch.alpha_lr,
              "arch_betas": tuple(adam.defaults["betas"]), "arch_weight_decay": config.optim.arch.weight_decay,
              "lambda": config.optim.sub_obj.sub_loss_factor, "tau": config.optim.sub_obj.log_base}
    if (theirs != HYPER or config.optim.arch.beta_lr != HYPER["arch_lr"] or not config.optim.if_sub_obj
            or config.search_params.weight_sample_num != 1 or config.search_params.sample_policy != "prob"):
        raise RuntimeError(f"the authors' config differs from the benchmark's hyper-parameters: {theirs} vs {HYPER}")
    # Their search loop freezes the other group before each phase (search.py: set_param_grad_state).
    search_optim.set_param_grad_state("Weights" if kind == "weight" else "Arch")
    super_model.train()
    search_stage = 1  # softmax(alpha) sampling: the stage in which architecture steps run

    if kind == "weight":
        def step(x, y):
            scheduler.step()  # SearchTrainer.train: once per weight step
            search_optim.weight_step(x.cuda(), y.cuda(), super_model, search_stage)
    else:
        def step(x, y):
            search_optim.arch_step(x.cuda(), y.cuda(), super_model, search_stage)

    arch = {id(p) for p in super_model.module.arch_parameters}
    counts = {"weights": sum(p.numel() for p in super_model.parameters() if id(p) not in arch),
              "arch_scalars": sum(p.numel() for p in super_model.parameters() if id(p) in arch)}
    return step, build, counts


def build_ours(kind: str, batch: int):
    import torch

    sys.path.insert(0, str(REPO))
    from densenas import native
    from densenas.search import SearchConfig, Searcher
    from densenas.supernet import SuperNet

    config = SearchConfig.model_validate({
        "epochs": 10, "warmup_epochs": 0, "batch_size": batch, "lambda": HYPER["lambda"], "tau": HYPER["tau"],
        "weights": {"lr": HYPER["lr"], "momentum": HYPER["momentum"], "weight_decay": HYPER["weight_decay"]},
        "arch": {"lr": HYPER["arch_lr"], "betas": list(HYPER["arch_betas"]),
                 "weight_decay": HYPER["arch_weight_decay"]}})
    torch.manual_seed(0)
    t = time.perf_counter()
    net = SuperNet("imagenet_mbconv", CLASSES)
    searcher = Searcher(net, config, steps_per_epoch=100, log=None)
    build = time.perf_counter() - t
    fn = searcher.weight_step if kind == "weight" else searcher.arch_step

    def step(x, y):
        fn((x, y))

    counts = {"weights": sum(p.numel() for p in net.weight_parameters()),
              "arch_scalars": sum(p.numel() for p in net.arch_parameters()),
              "native_bn": native.bn_act() is not None}
    return step, build, counts


def _batch(size: int, batch: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, CLASSES, (batch,), generator=g)


def child(spec: dict) -> dict:
    """One row in one process: role 'time' (both sides interleaved) or 'rss-ours' / 'rss-theirs' (one side)."""
    import torch

    if spec.get("malloc", "keep") == "keep":
        sys.path.insert(0, str(REPO))
        from jobs.train import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(spec["threads"])
    kind, size, batch = spec["kind"], spec["size"], spec["batch"]
    rss_import = _rss_gib()
    sides = {"time": ("ours", "theirs"), "rss-ours": ("ours",), "rss-theirs": ("theirs",)}[spec["role"]]
    steps, builds, counts, rss_built = {}, {}, {}, {}
    for side in sides:
        if side == "ours":
            steps[side], builds[side], counts[side] = build_ours(kind, batch)
        else:
            steps[side], builds[side], counts[side] = build_theirs(spec["tree"], kind, batch)
        rss_built[side] = _rss_gib()
    x, y = _batch(size, batch)
    times: dict[str, list[float]] = {s: [] for s in sides}
    warm: dict[str, list[float]] = {s: [] for s in sides}
    load_before = os.getloadavg()
    for n in range(spec["warmup"] + spec["steps"]):
        order = sides if n % 2 == 0 else sides[::-1]
        for side in order:
            t = time.perf_counter()
            steps[side](x, y)
            dt = time.perf_counter() - t
            (times if n >= spec["warmup"] else warm)[side].append(dt)
        shown = ", ".join(f"{s} {(times if n >= spec['warmup'] else warm)[s][-1]:.3f} s" for s in order)
        print(f"    {spec['role']} {kind} {size}x{size} b{batch} step {n}{' (warm-up)' if n < spec['warmup'] else ''}: "
              f"{shown}; load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    return {"role": spec["role"], "kind": kind, "size": size, "batch": batch, "times": times, "warmup_times": warm,
            "build_s": builds, "counts": counts, "rss_after_import_gib": rss_import, "rss_after_build_gib": rss_built,
            "peak_rss_gib": _rss_gib(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
            "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- the driver
def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node()}


def _run_child(spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.time()
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                         stderr=None, text=True, cwd=REPO, env=env, timeout=3 * 3600)
    if res.returncode:
        raise RuntimeError(f"{spec['role']} {spec['kind']} {spec['size']} b{spec['batch']} failed "
                           f"(exit {res.returncode}; its stderr is above)")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.time() - t
    return out


def _stats(v: list[float]) -> dict:
    return {"min_s": min(v), "median_s": statistics.median(v), "max_s": max(v), "n": len(v)}


def run_row(kind: str, size: int, batch: int, args: argparse.Namespace, authors: dict) -> dict:
    base = {"kind": kind, "size": size, "batch": batch, "threads": args.threads, "tree": authors["tree"],
            "warmup": args.warmup, "malloc": args.malloc}
    load_before = os.getloadavg()
    print(f"{kind} step {size}x{size} batch {batch}: interleaved timing (both codes in one process) ...", flush=True)
    timed = _run_child({**base, "role": "time", "steps": args.steps}, args.threads)
    rss = {}
    rss_steps = args.steps if args.rss_steps is None else args.rss_steps
    for side in ("ours", "theirs"):
        print(f"{kind} step {size}x{size} batch {batch}: peak RSS, {side} alone ...", flush=True)
        rss[side] = _run_child({**base, "role": f"rss-{side}", "steps": rss_steps}, args.threads)
    ours, theirs = timed["times"]["ours"], timed["times"]["theirs"]
    # Pair each of our steps with the authors' step next to it (same order slot: same neighbourhood).
    paired = [b / a for a, b in zip(ours, theirs)]
    row = {
        "kind": kind, "size": size, "batch": batch,
        "ours": {**_stats(ours), "times_s": ours, "warmup_s": timed["warmup_times"]["ours"],
                 "peak_rss_gib": rss["ours"]["peak_rss_gib"], "rss_after_import_gib": rss["ours"]["rss_after_import_gib"],
                 "rss_after_build_gib": rss["ours"]["rss_after_build_gib"]["ours"],
                 "solo_median_s": statistics.median(rss["ours"]["times"]["ours"]),
                 "build_s": timed["build_s"]["ours"], **timed["counts"]["ours"]},
        "theirs": {**_stats(theirs), "times_s": theirs, "warmup_s": timed["warmup_times"]["theirs"],
                   "peak_rss_gib": rss["theirs"]["peak_rss_gib"],
                   "rss_after_import_gib": rss["theirs"]["rss_after_import_gib"],
                   "rss_after_build_gib": rss["theirs"]["rss_after_build_gib"]["theirs"],
                   "solo_median_s": statistics.median(rss["theirs"]["times"]["theirs"]),
                   "build_s": timed["build_s"]["theirs"], **timed["counts"]["theirs"]},
        "speedup_median": statistics.median(theirs) / statistics.median(ours),
        "speedup_min": min(theirs) / min(ours),
        "speedup_paired_median": statistics.median(paired),
        "interleaved_process_peak_rss_gib": timed["peak_rss_gib"],
        "rss_steps": rss_steps,
        "load_before": list(load_before), "load_after": list(os.getloadavg()),
        "load_during_timing": [timed["load_before"][0], timed["load_after"][0]],
        "wall_s": {"time": timed["wall_s"], "rss_ours": rss["ours"]["wall_s"], "rss_theirs": rss["theirs"]["wall_s"]},
    }
    row["faster"] = row["speedup_median"] >= GOAL_SPEEDUP
    row["lower_rss"] = row["ours"]["peak_rss_gib"] < row["theirs"]["peak_rss_gib"]
    print(f"  => speed-up (median theirs / median ours) {row['speedup_median']:.2f}x; peak RSS ours "
          f"{row['ours']['peak_rss_gib']:.2f} GiB vs theirs {row['theirs']['peak_rss_gib']:.2f} GiB", flush=True)
    return row


def _load(v: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in v)


def report(result: dict) -> str:
    m, a, rows = result["machine"], result["authors"], result["rows"]
    counts = rows[0]
    same_space = all(r["ours"]["weights"] == r["theirs"]["weights"] and
                     r["ours"]["arch_scalars"] == r["theirs"]["arch_scalars"] for r in rows)
    lines = [
        "## Search steps vs the authors' code, side by side (issue 14)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, Python {m['python']}; "
        f"{result['threads']} torch thread(s). Load average (1 / 5 / 15 min) before: {_load(result['load_before'])}; "
        f"after: {_load(result['load_after'])}. {result['date']}, {result['elapsed_s'] / 60:.1f} min in all.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Authors' code: JaminFong/DenseNAS at {a['commit'] or 'unknown commit'} ({a['source']}"
        + (f", exported to {a['tree']}" if a["exported"] else "") + "), imported at run time and run unmodified "
        "except, in the benchmark's processes only, `.cuda()` as a no-op, `yaml.load` given a Loader and, during "
        "their `rescale_arch_params`, a 0-dim `scatter_` source broadcast to the index (current PyTorch rejects it; both sampled ops get the eq. 9 shift). Their "
        "`Network` (models/search_space_mbv2.py) from their configs/imagenet_search_cfg_mbv2.yaml in "
        "`nn.DataParallel`, stepped by their `run_apis/optimizer.Optimizer` (`weight_step` after their scheduler's "
        "step / `arch_step`, search stage 1, the other parameter group frozen as their search loop does) with "
        "their latency list. Ours: `densenas.search.Searcher` on `SuperNet('imagenet_mbconv', 100)` (channels_last"
        + ("; training BatchNorm(+ReLU6) by the `densenas.native` kernel" if counts["ours"].get("native_bn")
           else "; aten's BatchNorm: the `densenas.native` kernel was not available") + ").",
        f"Super networks: ours {counts['ours']['weights']:,} weights + {counts['ours']['arch_scalars']} architecture "
        f"parameters, theirs {counts['theirs']['weights']:,} + {counts['theirs']['arch_scalars']}"
        f"{' (the same space)' if same_space else ' (**the counts differ**)'}. Same hyper-parameters: SGD lr "
        f"{HYPER['lr']}, momentum {HYPER['momentum']}, weight decay {HYPER['weight_decay']}; Adam lr {HYPER['arch_lr']}, "
        f"betas {HYPER['arch_betas']}, weight decay {HYPER['arch_weight_decay']}; lambda {HYPER['lambda']}, "
        f"tau {HYPER['tau']}. Random images and labels, compute only.",
        "",
        f"Speed: per row one process holds both codes and alternates them step by step (order alternating), "
        f"{result['warmup']} warm-up then {result['steps']} timed steps each; speed-up = median(theirs) / median(ours) "
        "(paired: median over the steps of theirs / ours next to it). Peak RSS: one process cannot separate the two "
        "sides, so each side runs the same row alone in its own process (its own code only imported; "
        f"{rows[0]['rss_steps']} steps after the warm-up) and reports its `VmHWM` (peak RSS of that process image); the interleaved process's peak "
        "(both networks) is shown for reference. "
        + ("Every process, both sides', runs with glibc malloc keeping freed memory for the next step (no trimming "
           "below 1 GiB, no mmap under 32 MiB), as the pipeline's Train workers set it "
           "(`jobs.train.keep_freed_memory`); `--malloc default` runs glibc's defaults."
           if result.get("malloc", "default") == "keep" else "glibc malloc with its default settings (`--malloc default`)."),
        "",
        "| step | input | ours min / median s | authors min / median s | speed-up (median) | paired | ours peak RSS GiB "
        "| authors peak RSS GiB | both in one process GiB | 1-min load during |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, t = r["ours"], r["theirs"]
        lines.append(
            f"| {r['kind']} | {r['size']}x{r['size']} b{r['batch']} | {o['min_s']:.3f} / {o['median_s']:.3f} "
            f"| {t['min_s']:.3f} / {t['median_s']:.3f} | **{r['speedup_median']:.2f}x** | {r['speedup_paired_median']:.2f}x "
            f"| {o['peak_rss_gib']:.2f} | {t['peak_rss_gib']:.2f} | {r['interleaved_process_peak_rss_gib']:.2f} "
            f"| {r['load_during_timing'][0]:.2f} -> {r['load_during_timing'][1]:.2f} |")

    def verdict(key: str) -> str:
        missed = [f"{r['kind']} {r['size']}x{r['size']} b{r['batch']}" for r in rows if not r[key]]
        return f"**met** on all {len(rows)} rows" if not missed else \
            f"**missed** on {len(missed)} of {len(rows)} ({', '.join(missed)})"

    lines += ["", f"Goal >= {GOAL_SPEEDUP}x faster (ratio of medians): {verdict('faster')}. "
                  f"Lower peak RSS than the authors': {verdict('lower_rss')}."]
    if result["rows_are_goal_rows"] is False:
        lines += ["", "(Not the goal's configuration: these rows are a smoke run, not a measurement of the goal.)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors", default=DEFAULT_AUTHORS, help="the authors' DenseNAS checkout (default: %(default)s)")
    p.add_argument("--authors-cache", type=Path, default=DEFAULT_CACHE,
                   help="where a checkout without work tree is exported (default: %(default)s)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 64], help="input sizes (default: 224 64)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size for every size (default: 8 at 224, 32 at 64, 32 otherwise)")
    p.add_argument("--kinds", nargs="+", choices=["weight", "arch"], default=["weight", "arch"])
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per side (default: 2)")
    p.add_argument("--steps", type=int, default=9, help="timed steps per side (default: 9)")
    p.add_argument("--rss-steps", type=int, default=None,
                   help="steps after the warm-up in the per-side peak-RSS processes (default: --steps)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="glibc malloc in every benchmark process, both sides': 'keep' freed memory for the next "
                        "step as the pipeline's Train workers do (jobs.train.keep_freed_memory), or glibc's "
                        "'default' (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output path without suffix: writes OUT.md and OUT.json (default: docs/benchmarks/vs_authors)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.warmup < 0 or args.steps < 1:
        p.error("--warmup must be >= 0 and --steps >= 1")
    try:
        authors = resolve_authors(args.authors, args.authors_cache)
    except AuthorsCodeMissing as e:
        print(e, file=sys.stderr)
        return 2
    start, t0 = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), time.time()
    load_before = list(os.getloadavg())
    info = machine()
    print(f"machine: {info}; load {_load(load_before)}; authors' code: {authors}", flush=True)
    rows = []
    for size in args.sizes:
        batch = args.batch or DEFAULT_BATCH.get(size, 32)
        for kind in args.kinds:
            rows.append(run_row(kind, size, batch, args, authors))
    goal_rows = {(k, s, b) for k in ("weight", "arch") for s, b in DEFAULT_BATCH.items()}
    result = {
        "command": "python bench/bench_vs_authors.py" + "".join(" " + shlex.quote(a) for a in argv),
        "date": start, "elapsed_s": time.time() - t0, "machine": info, "threads": args.threads,
        "warmup": args.warmup, "steps": args.steps, "malloc": args.malloc, "authors": authors, "hyper_parameters": HYPER,
        "goal": {"speedup_median_at_least": GOAL_SPEEDUP, "lower_peak_rss": True},
        "load_before": load_before, "load_after": list(os.getloadavg()),
        "rows_are_goal_rows": {(r["kind"], r["size"], r["batch"]) for r in rows} == goal_rows and args.threads == 2,
        "met": {"faster": all(r["faster"] for r in rows), "lower_rss": all(r["lower_rss"] for r in rows)},
        "rows": rows,
    }
    text = report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md, js = args.out.with_name(args.out.name + ".md"), args.out.with_name(args.out.name + ".json")
    md.write_text(text)
    js.write_text(json.dumps(result, indent=1) + "\n")
    print(text)
    print(f"wrote {md} and {js} ({result['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
