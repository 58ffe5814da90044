limit api { match { route GET "/a"; } key ip; }
