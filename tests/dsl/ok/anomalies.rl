namespace "auth";

// Failed logins per address, counted by every node in the store.
anomaly login_bruteforce {
  match { route POST "/login"; }
  key ip;
  count when status in [401, 403];
  detect 10 in 5min;
  then ban 15min, alert "security";
}

// One address trying many user names: flagged and slowed down.
anomaly credential_stuffing {
  match { route POST "/login"; }
  key ip;
  count when status in [401];
  detect distinct header("X-Login-User") trusted > 20 in 10min;
  then flag for 1h, tarpit 2s for 30min, alert "security";
}

// A client suddenly sending ten times its usual traffic.
anomaly burst {
  match { route ANY "/api/**"; }
  key ip;
  detect rate > 10x baseline over 1min;
  then alert "ops", flag;
}
