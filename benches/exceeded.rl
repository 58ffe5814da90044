# The policy of `bench_app tollgate-redis-exceeded`: the three limits of three_limits.rl, one
# of which (`fixed`) every request after the first exceeds, for a long time.
key identity = first_of(user_id, header("X-Client-Id"), ip);
limit window { match { route ANY "/api/**"; } key identity; algorithm sliding_window; rate 1_000_000_000/s; }
limit cell   { match { route GET "/api/v1/items/{id}"; } key identity; algorithm gcra; rate 1_000_000/s burst 1_000_000_000; }
limit fixed  { match { route ANY "/api/v1/**"; } key ip/24; algorithm fixed_window; rate 1/day; }
