-- wrk script: POST /txn with one compare (the key exists) and one set, for a uniformly random
-- seeded key (key:<n> below KV_BENCH_KEYS, default 100,000) and a 20-byte value: the
-- transaction twin of set_if_match.lua.
local keys = tonumber(os.getenv("KV_BENCH_KEYS") or "100000")
math.randomseed(os.time() + 3)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local key = math.random(0, keys - 1)
  local body = string.format(
    '{"compare":[{"key":"key:%d","exists":true}],"success":[{"op":"set","key":"key:%d","val":"%020d"}]}',
    key, key, math.random(0, 2^31))
  return wrk.format(nil, "/txn", nil, body)
end
