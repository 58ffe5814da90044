# Ten limits match `GET /api/v1/items/{id}` (the three algorithms of three_limits.rl in turn,
# each its own counter), with quotas never reached: how the cost grows with the limits a
# request counts (examples/bench_app.rs `tollgate-redis-ten`, scripts/bench-redis.sh).
limit l0 { match { route ANY "/api/**"; } key ip; algorithm sliding_window; rate 1_000_000_000/s; }
limit l1 { match { route ANY "/api/**"; } key ip; algorithm gcra; rate 1_000_000/s burst 1_000_000_000; }
limit l2 { match { route ANY "/api/**"; } key ip; algorithm fixed_window; rate 1_000_000_000/s; }
limit l3 { match { route ANY "/api/**"; } key ip; algorithm sliding_window; rate 1_000_000_000/s; }
limit l4 { match { route ANY "/api/**"; } key ip; algorithm gcra; rate 1_000_000/s burst 1_000_000_000; }
limit l5 { match { route ANY "/api/**"; } key ip; algorithm fixed_window; rate 1_000_000_000/s; }
limit l6 { match { route ANY "/api/**"; } key ip; algorithm sliding_window; rate 1_000_000_000/s; }
limit l7 { match { route ANY "/api/**"; } key ip; algorithm gcra; rate 1_000_000/s burst 1_000_000_000; }
limit l8 { match { route ANY "/api/**"; } key ip; algorithm fixed_window; rate 1_000_000_000/s; }
limit l9 { match { route ANY "/api/**"; } key ip; algorithm sliding_window; rate 1_000_000_000/s; }
