anomaly brute {
  match { route POST "/login"; }
  detect 0 in 5min;
}
