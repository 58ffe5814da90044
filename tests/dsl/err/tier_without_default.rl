tiers plans {
  from claim("plan");
  tier free { api = 1/s; }
}
