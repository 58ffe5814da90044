// Limits for Envoy's rate-limit service (gRPC): the domain and the descriptors Envoy's
// actions produce are request data.
version 1;

tiers plans {
  from descriptor("plan");
  default free;
  tier free { api = 10/min; }
  tier pro { api = 100/min; }
}

// [remote_address]: one counter per client address (the entry is the client's address).
limit per_address {
  match { domain "edge"; descriptor ["remote_address"]; }
  key ip;
  rate 100/min;
}

// [database=users, message_type=marketing, to_number]: nested, one counter per number.
limit marketing_texts {
  match {
    domain "messaging";
    descriptor ["database" == "users", "message_type" == "marketing", "to_number"];
  }
  key descriptor("to_number");
  rate 5/day;
}

// An entry anywhere in the descriptor, a regular expression, a tier from an entry.
limit api_by_plan {
  match { domain ~= "^edge"; descriptor("client_id"); descriptor("path") ~= "^/api/"; }
  key descriptor("client_id") + domain;
  rate plans.api;
}

// Secrets in entries are hashed in keys (`api_key`, anything with `token`).
limit per_api_key {
  match { domain "edge"; descriptor ["api_key"]; }
  key descriptor("api_key");
  rate 1_000/hour;
  mode shadow;
}

denylist blocked_clients {
  domain "edge" and descriptor("client_id") == "evil";
}

anomaly over_limit_bursts {
  match { domain "edge"; }
  key descriptor("client_id");
  count when status in [429];
  detect 50 in 1min;
  then ban 10min;
}

limit partner_calls {
  match { domain "edge"; descriptor ["partner"]; }
  key descriptor("partner");
  rate 1_000/min;
  replaces per_address;
}
