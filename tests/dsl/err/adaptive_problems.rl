# Adaptive limits: what each block takes, and where it applies.

limit with_a_rate {
  match { route ANY "/a"; }
  algorithm adaptive_concurrency;
  rate 100/min;
}

limit not_adaptive {
  match { route ANY "/b"; }
  rate 100/min;
  adaptive gradient { initial 10; }
}

limit unknown_method {
  match { route ANY "/c"; }
  algorithm adaptive_concurrency;
  adaptive gradiant { initial 10; }
}

limit bad_tuning {
  match { route ANY "/d"; }
  algorithm adaptive_concurrency;
  adaptive gradient {
    initail 10;
    tolerance 50%;
    smoothing 150%;
    interval 10;
    max 5;
    max 6;
  }
}

limit bounds_out_of_order {
  match { route ANY "/e"; }
  algorithm adaptive_concurrency;
  adaptive aimd { initial 50; min 10; max 20; backoff 0.9; timeout 1s; }
}

limit vegas_upside_down {
  match { route ANY "/f"; }
  algorithm adaptive_concurrency;
  adaptive vegas { alpha 6; beta 3; }
}

limit bad_statuses {
  match { route ANY "/g"; }
  admission {
    success when status in [200..99, 700];
    threshold 95%;
    aggression 0.5;
  }
}

limit twice {
  match { route ANY "/h"; }
  algorithm adaptive_concurrency;
  adaptive gradient { }
  adaptive aimd { }
  cost 5;
}

limit for_envoy {
  match { domain "edge"; }
  key descriptor("remote_address");
  rate 10/s;
  admission { threshold 90%; }
}

limit banning {
  match { route ANY "/i"; }
  algorithm adaptive_concurrency;
  on_exceed reject 503 ban 5min;
}

limit soft_admission {
  match { route ANY "/j"; }
  admission { }
  soft warn at 80%;
}

limit storeless {
  match { route ANY "/k"; }
  algorithm adaptive_concurrency;
  on_store_error deny;
}

limit admission_per_message {
  match { route ANY "/l"; }
  rate 10/s;
  counts messages;
  admission { }
}
