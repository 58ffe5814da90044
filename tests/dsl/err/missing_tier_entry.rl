tiers plans {
  from header("X-Plan");
  default free;
  tier free { api = 1/s; }
  tier pro { api = 10/s; search = 5/s; }
}
limit search { rate plans.search; }
