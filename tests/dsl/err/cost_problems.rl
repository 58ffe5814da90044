limit a { rate 10/min; cost 0; }
limit b { rate 10/min; cost header("X-Cost") default 20 max 10; }
limit c { rate 2 concurrent; cost 2; }
