# The policy of benches/engine.rs and examples/bench_app.rs: three limits match
# `GET /api/v1/items/{id}`, with quotas never reached; two more limits sit on other routes.
key identity = first_of(user_id, header("X-Client-Id"), ip);
limit window { match { route ANY "/api/**"; } key identity; algorithm sliding_window; rate 1_000_000_000/s; }
limit cell   { match { route GET "/api/v1/items/{id}"; } key identity; algorithm gcra; rate 1_000_000/s burst 1_000_000_000; }
limit fixed  { match { route ANY "/api/v1/**"; } key ip/24; algorithm fixed_window; rate 1_000_000_000/s; }
limit other  { match { route POST "/auth/login"; } rate 5/min; }
limit static { match { route GET "/static/**"; } rate 100/s; }
