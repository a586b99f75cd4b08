-- wrk script: POST /set with a JSON body for a uniformly random key among KV_BENCH_WRITE_KEYS
-- (default 100,000) and a 20-byte value.
local keys = tonumber(os.getenv("KV_BENCH_WRITE_KEYS") or "100000")
math.randomseed(os.time() + 1)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local body = string.format('{"key":"w:%d","val":"%020d"}', math.random(0, keys - 1), math.random(0, 2^31))
  return wrk.format(nil, "/set", nil, body)
end
