-- wrk script for bench/serve: POST the JPEG files given after `--`, cycling, and print one JSON line.
local bodies = {}
local counter = 0

function init(args)
  for _, path in ipairs(args) do
    local f = assert(io.open(path, "rb"))
    table.insert(bodies, f:read("*all"))
    f:close()
  end
end

function request()
  counter = counter + 1
  local body = bodies[(counter % #bodies) + 1]
  return wrk.format("POST", nil, {["Content-Type"] = "image/jpeg"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  local errors = e.status + e.connect + e.read + e.write + e.timeout
  io.write(string.format(
    '{"requests": %d, "errors": %d, "images_per_s": %.1f, "p50_ms": %.1f, "p99_ms": %.1f, "tool": "wrk"}\n',
    summary.requests, errors, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
