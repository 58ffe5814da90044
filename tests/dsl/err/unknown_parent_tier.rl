tiers plans {
  from header("X-Plan");
  default free;
  tier free { api = 1/s; }
  tier pro extends fre { api = 2/s; }
}
