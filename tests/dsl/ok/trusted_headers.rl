# Headers believed from any client, not only from trusted proxies.
tiers open_plans {
  from header("X-Plan") trusted;
  default standard;
  tier standard { api = 100/min; }
  tier batch extends standard { api = 20/min; }
}

limit per_device {
  key first_of(header("X-Device") trusted, header("X-Client-Id"), ip);
  rate open_plans.api;
}
