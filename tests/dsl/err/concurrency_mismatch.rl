limit a { algorithm gcra; rate 5 concurrent; }
limit b { algorithm concurrency; rate 5/min; }
