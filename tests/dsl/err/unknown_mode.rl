limit api { rate 1/s; mode shadw; on_store_error explode; }
