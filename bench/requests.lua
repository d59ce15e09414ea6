-- wrk script: round-robin over request lines "METHOD<TAB>PATH<TAB>TOKEN<TAB>BODY" read from the file named by
-- the first argument. "{n}" in a body becomes a value unique to this run (second argument) and request, so
-- created names never collide. Prints one JSON line, after the marker, with throughput, latency, statuses and,
-- for answers of 400 and above, their error codes ("503 busy").

local lines = {}
local cursor = 0
local counter = 0
local nonce = ""
statuses = {}
codes = {}

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    local method, path, token, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t?(.*)$")
    if method then
      table.insert(lines, { method, path, token, body })
    end
  end
  nonce = (args[2] or "") .. "-" .. tid
  -- Threads start apart, so two of them do not hit the same Host at the same moment.
  cursor = math.floor(#lines * tid / (tonumber(args[3]) or 1))
end

function request()
  cursor = cursor % #lines + 1
  counter = counter + 1
  local entry = lines[cursor]
  local headers = { ["Authorization"] = "Bearer " .. entry[3] }
  local body = nil
  if entry[4] ~= "" then
    headers["Content-Type"] = "application/json"
    body = entry[4]:gsub("{n}", nonce .. "-" .. counter)
  end
  return wrk.format(entry[1], entry[2], headers, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status >= 400 then
    -- The service's error envelope names the cause: "503 busy" and "503 database_unavailable" differ.
    local code = body and body:match('"error_code"%s*:%s*"([%w_]+)"') or "?"
    local key = status .. " " .. code
    codes[key] = (codes[key] or 0) + 1
  end
end

function done(summary, latency, requests)
  local counts = {}
  local causes = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + count
    end
    for key, count in pairs(thread:get("codes")) do
      causes[key] = (causes[key] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(counts) do
    table.insert(parts, string.format('"%d": %d', status, count))
  end
  local cause_parts = {}
  for key, count in pairs(causes) do
    table.insert(cause_parts, string.format('"%s": %d', key, count))
  end
  local errors = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p95_us": %d, "p99_us": %d, '
      .. '"mean_us": %.1f, "socket_errors": %d, "statuses": {%s}, "codes": {%s}}\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99), latency.mean,
    errors.connect + errors.read + errors.write + errors.timeout,
    table.concat(parts, ", "), table.concat(cause_parts, ", ")
  ))
end
