-- Shared by the wrk scripts (found through LUA_PATH, set by bench/common.py): the session
-- ids, one id per thread, and done() printing one JSON line the Python side parses.
local M = {}

M.sessions = tonumber(os.getenv("BENCH_SESSIONS") or "100")
M.api_key = os.getenv("BENCH_API_KEY") or "k"

local next_id = 0

-- Runs in the main Lua state once per thread: give each thread its own id so that the
-- threads start at different sessions.
function M.setup(thread)
   thread:set("thread_id", next_id)
   next_id = next_id + 1
end

-- Round-robin over the prepared requests; each thread starts at its own offset.
function M.cycle(reqs)
   local i = ((thread_id or 0) * 37) % #reqs
   return function()
      i = i % #reqs + 1
      return reqs[i]
   end
end

function M.done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
      '"connect_errors":%.0f,"read_errors":%.0f,"write_errors":%.0f,' ..
      '"status_errors":%.0f,"timeouts":%.0f,' ..
      '"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"p999_us":%.0f,' ..
      '"mean_us":%.1f,"max_us":%.0f}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.mean, latency.max))
end

return M
