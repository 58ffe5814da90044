# benches/three_limits.rl made local-first: three counting limits match
# `GET /api/v1/items/{id}`, with quotas never reached, each synced to Redis every 50 ms.
key identity = first_of(user_id, header("X-Client-Id"), ip);
limit window { match { route ANY "/api/**"; } key identity; algorithm sliding_window; rate 1_000_000_000/s; sync every 50ms; }
limit count  { match { route GET "/api/v1/items/{id}"; } key identity; algorithm fixed_window; rate 1_000_000_000/s; sync every 50ms; }
limit fixed  { match { route ANY "/api/v1/**"; } key ip/24; algorithm fixed_window; rate 1_000_000_000/s; sync every 50ms; }
limit other  { match { route POST "/auth/login"; } rate 5/min; }
limit static { match { route GET "/static/**"; } rate 100/s; }
