# Costs read from the response: every way to get them wrong, each reported at its place.
limit no_reserve {
  rate 1_000/min;
  cost response json("usage.total_tokens");
}
limit reserve_alone {
  rate 1_000/min;
  reserve 100;
}
limit on_concurrency {
  algorithm concurrency;
  rate 5 concurrent;
  cost response header("X-Usage");
  reserve 1;
}
limit on_messages {
  rate 1_000/min;
  counts messages;
  cost response json("usage.total_tokens");
  reserve 10;
}
limit on_descriptors {
  match { domain "edge"; descriptor ["tenant"]; }
  key descriptor("tenant");
  rate 1_000/min;
  cost response json("usage.total_tokens");
  reserve 10;
}
limit bad_parts {
  rate 1_000/min;
  cost response json("usage..total") + 0 * json("") + header("bad header") default 900 max 800;
  reserve json("max_tokens") max 32_000;
}
limit too_large {
  rate 1_000/min;
  cost response json("usage.total_tokens") max 9_007_199_254_740_992;
  reserve 9_007_199_254_740_992;
}
limit reserve_default_over {
  rate 1_000/min;
  cost response json("usage.total_tokens");
  reserve header("X-Max") default 600 max 500;
}
limit hits_on_http {
  rate 1_000/min;
  cost response hits_addend;
}
limit hits_mixed {
  match { domain "ai"; descriptor ["tenant"]; }
  key descriptor("tenant");
  rate 1_000/min;
  cost response hits_addend + json("usage.total_tokens");
  reserve 10;
}
limit hits_reserved {
  match { domain "ai"; descriptor ["tenant"]; }
  key descriptor("tenant");
  rate 1_000/min;
  cost response hits_addend;
  reserve 10;
}
