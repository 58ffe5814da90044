version 1;

tiers plans {
  from header("X-Plan");
  default free;
  tier free { api = 10/min; }
}

tiers envoy_plans {
  from descriptor("plan");
  default free;
  tier free { api = 10/min; }
}

// HTTP request data never holds for an Envoy rate-limit request.
limit mixed {
  match { domain "edge"; route GET "/login"; header("X-Debug"); }
  key header("X-Client");
  rate 5 concurrent;
}

limit counted_wrong {
  match { domain "edge"; }
  cost header("X-Cost");
  counts messages;
  rate 10/s;
}

limit tiered_wrong {
  match { descriptor ["client"]; }
  rate plans.api;
}

// A descriptor entry never has a value for an HTTP request.
limit http_with_descriptor_key {
  match { route "/api/**"; }
  key descriptor("client");
  rate envoy_plans.api;
}

limit empty_entry {
  match { descriptor [""]; }
  rate 1/s;
}

anomaly wrong_distinct {
  match { domain "edge"; }
  key descriptor("client");
  detect distinct header("X-User") > 3 in 1min;
  then ban 1min;
}

# `replaces` across an Envoy request's descriptors: not in an HTTP limit, names limits for
# descriptors, not itself.
limit http_replacing {
  key ip;
  rate 10/min;
  replaces per_ip_http;
}
limit per_ip_http {
  key ip;
  rate 10/min;
}
limit replacing {
  match { domain "edge"; descriptor ["k"]; }
  key descriptor("k");
  rate 10/min;
  replaces replacing, per_ip_http, no_such_limit;
}
