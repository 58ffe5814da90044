# Limits on what flows through a connection.
limit chat { match { route GET "/ws/chat"; } key connection; counts messages; algorithm fixed_window; rate 60/min; }
limit speed { match { route GET "/downloads/**"; } key ip + connection; counts bytes; algorithm token_bucket; rate 1_000_000/s burst 2_000_000; }
limit handshakes { match { route GET "/ws/**"; } counts requests; rate 10/min; }
