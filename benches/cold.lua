-- wrk script for cold tokens (benches/cold.sh): every request carries the next token of
-- a file, one never sent before in the run.
--   wrk -t2 ... -s benches/cold.lua URL -- TOKENS_FILE THREADS
-- Thread i of n sends lines i, i+n, i+2n, ... of the file. A thread that runs out starts
-- its share again; done() prints how many requests repeated a token as "repeats N" (a
-- cold run should print 0).
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local file, n = args[1], tonumber(args[2])
  tokens = {}
  local line_no = 0
  for line in io.lines(file) do
    if line_no % n == id then
      tokens[#tokens + 1] = line
    end
    line_no = line_no + 1
  end
  sent = 0
  repeats = 0
  headers = {}
  for k, v in pairs(wrk.headers) do headers[k] = v end
end

function request()
  sent = sent + 1
  if sent > #tokens then repeats = sent - #tokens end
  headers["Authorization"] = "Bearer " .. tokens[(sent - 1) % #tokens + 1]
  return wrk.format(nil, nil, headers)
end

function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do
    total = total + (t:get("repeats") or 0)
  end
  io.write(string.format("repeats %d\n", total))
end
