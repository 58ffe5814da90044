limit api { algorithm token_bucket; rate 10/s burst 0; }
