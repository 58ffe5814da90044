# A misspelt statement gets "did you mean", not the help of another statement.
limit api {
  match { route ANY "/api/**"; }
  algoritm gcra;
  rate 10/min;
}

limit login {
  match { route POST "/login"; }
  rate 5/min;
  on_exced reject 429;
}

limit export {
  match { route GET "/export"; }
  rate 5/min;
  priorty 10;
}

tier plans { default free; }
