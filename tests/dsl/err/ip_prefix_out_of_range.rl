limit api { key ip/129; rate 1/s; }
