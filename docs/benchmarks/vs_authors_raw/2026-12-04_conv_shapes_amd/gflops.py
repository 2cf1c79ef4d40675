"""GFLOP/s of the 1x1 convolution forwards in prof_shapes_arch224_output.txt (2 FLOP per multiply-add;
ms/step is the total over the step's calls of that shape, n the calls per step)."""
import ast, re, sys
for line in open(sys.argv[1]):
    m = re.match(r"mkldnn_convo\s+([\d.]+)ms/step n=\s*(\d+) (\[.*\])$", line.strip())
    if not m:
        continue
    ms, n, shapes = float(m.group(1)), int(m.group(2)), ast.literal_eval(m.group(3))
    (b, cin, h, w), (cout, _, kh, kw) = shapes[0], shapes[1]
    if kh != 1 or n == 0:
        continue
    flop = 2 * b * h * w * cin * cout * n
    print(f"1x1 {cin:5d}->{cout:5d} at {h:3d}x{w:<3d}: {ms:5.1f} ms/step, {flop / ms / 1e6:6.1f} GFLOP/s")
