limit a { counts widgets; rate 10/min; }
limit b { counts messages; rate 5 concurrent; }
