import json, sys
recs=[json.loads(l) for l in open(sys.argv[1])]
warm=[r for r in recs if r["phase"]=="warmup"]
h0=warm[0]["alpha_entropy"] if warm else recs[0]["alpha_entropy"]
pw=warm[-1]["derived_path_prob"] if warm else None
end=recs[-1]
print(f"epochs {len(recs)} arch_steps {end.get('arch_steps')} H(alpha) uniform {h0:.4f} end {end['alpha_entropy']:.4f} "
      f"drop {(h0-end['alpha_entropy'])/h0*100:.1f}% | path prob end-of-warmup {pw} end {end['derived_path_prob']:.4f} "
      f"ratio {end['derived_path_prob']/pw if pw else float('nan'):.2f} | H(beta) {end['beta_entropy']:.4f} | "
      f"lambda {end['lambda']:.4g} | derived {end['predicted_latency']:.4g} {end['latency_units']} path {end['derived']['path']}")
