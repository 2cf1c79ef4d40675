"""Where a retrain worker's training thread waits inside ray.train.report (py-spy raw stacks from
`bench/bench_overhead.py --profile DIR`): share of samples per stack tail below TrainContext.report.

    python report_wait.py DIR      # as run: pyspy_before, pyspy_after (copies of the --profile folders)
"""
import collections, glob, sys

for f in sorted(glob.glob(f"{sys.argv[1]}/retrain-2w-memory-pid*.txt")):
    c, tot = collections.Counter(), 0
    for line in open(f):
        stack, _, n = line.rstrip().rpartition(" ")
        if "_retrain_worker" not in stack or not n.isdigit():
            continue
        tot += int(n)
        frames = stack.split(";")
        hits = [i for i, x in enumerate(frames) if "TrainContext.report" in x or "_wrapped_fn" in x]
        if hits:
            c[" > ".join(x.split(" (")[0] for x in frames[hits[-1] + 1:])[-160:]] += int(n)
    print(f, "samples", tot)
    for k, v in c.most_common(4):
        print(f"  {v / tot:6.3f} {k}")
