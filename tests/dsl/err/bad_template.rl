limit api { match { route GET "/orders/{id"; } rate 1/s; }
limit other { match { route GET "orders/**x"; } rate 1/s; }
