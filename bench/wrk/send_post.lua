-- POST /api/messages/send with a ~200-byte JSON body whose `session_id` is s<N>, N
-- round-robin over BENCH_SESSIONS ids: the session is in the body.
local lib = require("benchlib")
local next_request

local MESSAGE = "Halo Budi! Pesanan #48213 sudah kami terima dan sedang diproses, estimasi kirim besok."

function setup(thread)
   lib.setup(thread)
end

function init(args)
   local reqs = {}
   local headers = { ["Content-Type"] = "application/json" }
   for n = 0, lib.sessions - 1 do
      local body = string.format(
         '{"session_id":"s%d","workspace_id":1,"recipient_phone":"628123456789",' ..
         '"message":"%s","type":"text","api_key":"%s"}', n, MESSAGE, lib.api_key)
      reqs[#reqs + 1] = wrk.format("POST", "/api/messages/send", headers, body)
   end
   next_request = lib.cycle(reqs)
end

function request()
   return next_request()
end

done = lib.done
