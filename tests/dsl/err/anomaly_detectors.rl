anomaly burst {
  match { route ANY "/api/**"; }
  detect rate > 1x baseline over 1min;
  then alert "ops";
}

anomaly twice {
  detect 10 in 5min;
  detect distinct header("X-User") > 20 in 10min;
  then ban 1h;
}

anomaly slow {
  detect distinct header("bad header") > 0 in 2d;
  then tarpit 1min for 40d, flag for 0s;
}
