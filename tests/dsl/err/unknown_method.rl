limit api { match { route GTE|post "/a"; } rate 1/s; }
