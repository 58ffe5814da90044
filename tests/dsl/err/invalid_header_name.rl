limit api { key header("X Client"); rate 1/s; }
