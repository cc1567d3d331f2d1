-- GET /api/sessions/s<N>/status?api_key=k, N round-robin over BENCH_SESSIONS ids: the
-- session is in the path.
local lib = require("benchlib")
local next_request

function setup(thread)
   lib.setup(thread)
end

function init(args)
   local reqs = {}
   for n = 0, lib.sessions - 1 do
      reqs[#reqs + 1] = wrk.format(
         "GET", "/api/sessions/s" .. n .. "/status?api_key=" .. lib.api_key)
   end
   next_request = lib.cycle(reqs)
end

function request()
   return next_request()
end

done = lib.done
