# one file, several unrelated problems: all are reported
version 1;
limit a { algorithm nope; rate 5/min; }
limit b { rate 5/min burst 2; }
limit c { match { route PUT "/c"; } rate 0/s; mode loud; }
