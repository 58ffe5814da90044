key ip = header("X-Real-IP");
limit api { rate 10/s; }
