tiers plans {
  from header("X-Plan");
  default a;
  tier a extends c { api = 1/s; }
  tier b extends a { api = 2/s; }
  tier c extends b { api = 3/s; }
}
