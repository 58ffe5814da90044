limit api { rate 1/s; }
limit other { rate 1/s; }
limit api { rate 2/s; }
