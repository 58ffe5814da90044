version 2;
limit api { rate 1/s; }
