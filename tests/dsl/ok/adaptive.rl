# Adaptive limits: each method, admission control alone and on a rate.

limit orders {
  match { route ANY "/api/orders/**"; }
  key global;
  algorithm adaptive_concurrency;
  adaptive gradient { initial 20; min 5; max 200; tolerance 1.25; smoothing 20%; interval 100ms; }
  admission { success when status in [200..399, 404]; threshold 95%; aggression 1.5; max_reject 80%; window 30s; min_requests 20; }
  on_exceed reject 503;
  lease 30s;
}

limit search {
  match { route GET "/api/search"; }
  key route;
  algorithm adaptive_concurrency;
  adaptive gradient2 { initial 10; min 2; max 100; tolerance 1.5; smoothing 0.2; long_window 600; }
}

limit uploads {
  match { route POST "/api/uploads"; }
  key global;
  algorithm adaptive_concurrency;
  adaptive aimd { initial 10; max 50; backoff 90%; timeout 2s; }
  mode shadow;
}

limit reports {
  match { route GET "/api/reports/**"; }
  key global;
  algorithm adaptive_concurrency;
  adaptive vegas { alpha 3; beta 6; }
}

limit defaulted {
  match { route GET "/api/plain"; }
  key global;
  algorithm adaptive_concurrency;
}

limit errors_only {
  match { route ANY "/api/**"; }
  key global;
  admission { }
}

limit rate_and_errors {
  match { route ANY "/api/payments/**"; }
  rate 100/min;
  admission { threshold 90%; window 1min; }
}
