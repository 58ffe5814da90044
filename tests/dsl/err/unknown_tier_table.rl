tiers plans { from header("X-Plan"); default free; tier free { api = 1/s; } }
limit api { rate plan.api; }
