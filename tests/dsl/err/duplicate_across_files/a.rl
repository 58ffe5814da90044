limit shared { rate 1/s; }
