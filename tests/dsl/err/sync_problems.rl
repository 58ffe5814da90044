# Local-first (`sync every`) where it cannot apply.
defaults { sync every 50ms; }

limit buckets {
  match { route GET "/a"; }
  key ip;
  algorithm token_bucket;
  rate 10/s burst 20;
}

limit inflight {
  match { route GET "/b"; }
  key ip;
  rate 5 concurrent;
  sync every 50ms;
}

limit open {
  match { route GET "/c"; }
  key ip;
  rate 100/min;
  on_store_error allow;
  sync every 100ms;
}

limit odd {
  match { route GET "/d"; }
  key ip;
  rate 100/min;
  sync every 25ms;
}

limit slow {
  match { route GET "/e"; }
  key ip;
  rate 100/min;
  sync every 2min;
}
