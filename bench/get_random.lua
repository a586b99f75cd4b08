-- wrk script: GET /get/key:<n> for a uniformly random n below KV_BENCH_KEYS (default 1,000,000),
-- the keys bench/make_input_db.py writes.
local keys = tonumber(os.getenv("KV_BENCH_KEYS") or "1000000")
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/get/key:" .. math.random(0, keys - 1))
end
