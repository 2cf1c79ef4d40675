"""Per-step timing of the 2-worker retrain stage from the comm hook's (enter, exit) wall times per rank.
python analyze_steps.py steps-rank0.json steps-rank1.json   (steps 40+ : after the first epoch)"""
import json, statistics as st, sys

a, b = (json.load(open(p)) for p in sys.argv[1:3])
n = min(len(a), len(b))


def q(x):
    x = sorted(x)
    return f"median {st.median(x):.2f} p90 {x[int(.9 * len(x))]:.2f} mean {st.mean(x):.2f} ms, x31 steps {sum(x) / len(x) * 31:.0f} ms/epoch"


print("steps", n)
print("imbalance |ready0 - ready1|:", q([abs(a[i][0] - b[i][0]) * 1000 for i in range(40, n)]))
print("rank 0 in the all-reduce:    ", q([(a[i][1] - a[i][0]) * 1000 for i in range(40, n)]))
print("rank 1 in the all-reduce:    ", q([(b[i][1] - b[i][0]) * 1000 for i in range(40, n)]))
print("rank 0 between all-reduces:  ", q([(a[i][0] - a[i - 1][1]) * 1000 for i in range(40, n)]))
print("rank 1 between all-reduces:  ", q([(b[i][0] - b[i - 1][1]) * 1000 for i in range(40, n)]))
