# A misspelt algorithm gets the closest one.
limit a { match { route ANY "/a"; } algorithm slidng_window; rate 10/min; }
limit b { match { route ANY "/b"; } algorithm tokenbucket; rate 10/min; }
limit c { match { route ANY "/c"; } algorithm fixed; rate 10/min; }
limit d { match { route ANY "/d"; } algorithm leaky_bucket; rate 10/min; }
