-- wrk script: 80% GET /get/key:<n> of random seeded keys (KV_BENCH_KEYS, default 1,000,000),
-- 20% POST /set over 100,000 keys, as bench/soak.py drives it.
local keys = tonumber(os.getenv("KV_BENCH_KEYS") or "1000000")
math.randomseed(os.time() + 2)
request = function()
  if math.random() < 0.8 then
    return wrk.format("GET", "/get/key:" .. math.random(0, keys - 1))
  end
  local body = string.format('{"key":"w:%d","val":"%020d"}', math.random(0, 99999), math.random(0, 2^31))
  return wrk.format("POST", "/set", {["Content-Type"] = "application/json"}, body)
end
