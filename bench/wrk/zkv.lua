-- wrk script for the zkv benchmark: builds each request, and reports one machine-readable line.
--
-- Arguments (after `--` on wrk's command line), all required, in this order:
--   mode         seed (GET /get and /set), rest-put, rest-get or webdis-get
--   set_percent  seed mode: percentage of /set requests (0: all /get, 100: all /set, 10: mix)
--   key_prefix   keys are key_prefix .. N for N in [0, key_count), or key_prefix .. "hot"
--   key_count    size of the uniform key space; 0 means the single hot key
--   value_bytes  size of the values written (/set's value parameter, PUT's body)
--   ttl_s        timeout of written keys, in seconds
--
-- The Python side (bench/http_load.py) builds the same requests for its fallback generator;
-- keep the two in step. done() prints one line starting with "ZKV_BENCH " followed by JSON:
-- requests, duration and errors from wrk's summary, latency percentiles in microseconds.

local mode, set_percent, key_prefix, key_count, ttl_s, value
local thread_count = 0

function setup(thread)
  thread:set("thread_index", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  mode = args[1]
  set_percent = tonumber(args[2])
  key_prefix = args[3]
  key_count = tonumber(args[4])
  value = string.rep("v", tonumber(args[5]))
  ttl_s = args[6]
  math.randomseed(os.time() * 1000 + (thread_index or 0))
end

local function key()
  if key_count == 0 then
    return key_prefix .. "hot"
  end
  return key_prefix .. math.random(0, key_count - 1)
end

function request()
  local k = key()
  if mode == "seed" then
    if set_percent > 0 and math.random(1, 100) <= set_percent then
      return wrk.format("GET", "/set?key=" .. k .. "&value=" .. value .. "&timeout=" .. ttl_s)
    end
    return wrk.format("GET", "/get?key=" .. k)
  elseif mode == "rest-put" then
    return wrk.format("PUT", "/v1/keys/" .. k .. "?ttl=" .. ttl_s, nil, value)
  elseif mode == "rest-get" then
    return wrk.format("GET", "/v1/keys/" .. k)
  elseif mode == "webdis-get" then
    return wrk.format("GET", "/GET/" .. k)
  end
  error("unknown mode " .. tostring(mode))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'ZKV_BENCH {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"p50_us": %.1f, "p99_us": %.1f, "p999_us": %.1f, "mean_us": %.1f, "max_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max))
end
