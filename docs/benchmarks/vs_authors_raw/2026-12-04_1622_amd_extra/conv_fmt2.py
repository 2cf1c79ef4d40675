import sys; sys.argv=[sys.argv[0]]
exec(open(__file__.replace("conv_fmt2", "conv_fmt")).read().split("for (ci")[0])
for (ci, co, k, g, hw, s) in [(144,144,3,144,56,1),(144,144,5,144,56,1),(72,72,5,72,56,1),(144,144,5,144,56,2),(192,192,5,192,28,1),(192,192,3,192,28,1),(240,240,5,240,28,2),(480,480,5,480,14,1),(480,480,3,480,14,1),(96,96,5,96,112,2),(48,48,5,48,112,1)]:
    a = bench(ci, co, k, g, hw, s); b = bench(ci, co, k, g, hw, s, torch.channels_last)
    print(f"dw {ci} k{k} s{s} {hw}x{hw}: NCHW {a:7.2f} ms  NHWC {b:7.2f} ms  NCHW/NHWC {a / b:5.2f}", flush=True)
