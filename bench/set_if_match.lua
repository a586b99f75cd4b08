-- wrk script: POST /set with If-Match: * (write only if the key exists) for a uniformly random
-- seeded key (key:<n> below KV_BENCH_KEYS, default 100,000) and a 20-byte value: a
-- conditional write, the single-key twin of txn_set.lua.
local keys = tonumber(os.getenv("KV_BENCH_KEYS") or "100000")
math.randomseed(os.time() + 2)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["If-Match"] = "*"
request = function()
  local body = string.format('{"key":"key:%d","val":"%020d"}', math.random(0, keys - 1), math.random(0, 2^31))
  return wrk.format(nil, "/set", nil, body)
end
