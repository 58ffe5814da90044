limit api {
  match { route GET "/a"; }
  rate 5/min;
