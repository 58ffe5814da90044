# The policy of `bench_app tollgate-redis-one`: one fixed window per client address, never
# reached — the same work as the stand-in's script, for a like-for-like comparison.
limit fixed { match { route ANY "/api/**"; } key ip; algorithm fixed_window; rate 1_000_000_000/s; }
