-- wrk script: each request names one of CLIENTS clients (X-Client-Id), chosen at random, so
-- that requests count in distinct keys. CLIENTS comes from the environment (default 10000).
local clients = tonumber(os.getenv("CLIENTS") or "10000")
request = function()
  return wrk.format(nil, nil, { ["X-Client-Id"] = "client-" .. math.random(clients) })
end
