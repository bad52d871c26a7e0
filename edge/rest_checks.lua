-- The edge's Lua filter. Rendered after the tables of rest_contract.py: ROUTES, MESSAGES,
-- HTTP_STATUS_HEADER, CHALLENGE, MAX_REQUEST_ID, ERROR_CODES, ERROR_MESSAGES, DIRECT_PATHS,
-- PATH_NORMALIZATION_FAILED.
--
-- Native gRPC is what Envoy (and so its transcoder) counts as gRPC: a content type of exactly
-- application/grpc or application/grpc+...; anything else (application/grpc-web, ...) is REST.
--
-- Request path (header names gRPC metadata cannot carry are dropped, for every request; then REST
-- only, native gRPC passes untouched apart from the request id check):
--   * a path (as Envoy normalized it: dot segments, double slashes, escaped unreserved
--     characters) that is no route's exactly, nor one Envoy answers itself (DIRECT_PATHS): 404,
--     with a hint when it differs from one only by a trailing slash. The transcoder would
--     serve "/api/v1/execute/" as "/api/v1/execute": no request may reach it unchecked;
--   * a known path with a method it does not take: 405 with Allow;
--   * the body, the query and the path variables checked against the request message: unknown
--     fields, wrong types and malformed values are a 400 whose message names the field and the
--     form it expects (the transcoder would drop unknown fields, and word its own complaints in
--     protobuf's terms);
--   * a client's x-request-id that the audit log could not hold: 400.
-- Response path (REST only): the status a service asked for in HTTP_STATUS_HEADER; every error
-- rewritten into one spelling, {"code":N,"message":"...","details":[]}, with nothing internal in
-- its message; WWW-Authenticate on every 401. A path Envoy refused to normalize (a NUL byte,
-- %00) never reaches the request path: its 400 is worded here, from the path the local reply
-- carries, naming the path variable that holds the NUL.

local byte, char, find, sub, format, gsub, lower = string.byte, string.char, string.find, string.sub, string.format, string.gsub, string.lower
local concat, floor, huge = table.concat, math.floor, math.huge

local NULL = {}
local MAX_DEPTH = 64
local MAX_ECHO = 64
-- Where the request handler leaves the request id for the response handler.
local METADATA_NAMESPACE = "pythonon.edge"

-- Index every message's fields by their JSON and proto names, and list them for messages.
for _, message in pairs(MESSAGES) do
  local by_name, names = {}, {}
  for _, field in ipairs(message.fields) do
    by_name[field.json] = field
    by_name[field.proto] = field
    names[#names + 1] = field.json
  end
  message.by_name = by_name
  message.names = concat(names, ", ")
end

local function fail(message)
  error({ refusal = message }, 0)
end

-- Envoy's rule (Grpc::Common::hasGrpcContentType): exactly application/grpc, or application/grpc+
-- followed by anything. application/grpc-web, application/grpcx or "application/grpc; ..." are not
-- gRPC to the transcoder, which transcodes them as REST: they are checked as REST here too.
local GRPC_CONTENT_TYPE = "application/grpc"

local function is_grpc(content_type)
  return content_type == GRPC_CONTENT_TYPE or sub(content_type, 1, #GRPC_CONTENT_TYPE + 1) == GRPC_CONTENT_TYPE .. "+"
end

-- Names and values a client sent are echoed shortened, cut at a character boundary.
local function shorten(text)
  if #text <= MAX_ECHO then
    return text
  end
  return (gsub(sub(text, 1, MAX_ECHO), "[\192-\255][\128-\191]*$", "")) .. "..."
end

-- Byte loops rather than patterns: LuaJIT compiles them, where a pattern with a character class
-- costs a match attempt per position (a 4 MiB body would hold an Envoy worker for a third of a
-- second). The position of the first byte that is not UTF-8, or nil.
local function first_invalid_utf8(s)
  local i, n = 1, #s
  while i <= n do
    local c = byte(s, i)
    if c < 0x80 then
      i = i + 1
    else
      local c2 = byte(s, i + 1) or 0
      if c >= 0xC2 and c <= 0xDF then
        if c2 < 0x80 or c2 > 0xBF then return i end
        i = i + 2
      elseif c >= 0xE0 and c <= 0xEF then
        local c3 = byte(s, i + 2) or 0
        local low = (c == 0xE0) and 0xA0 or 0x80
        local high = (c == 0xED) and 0x9F or 0xBF
        if c2 < low or c2 > high or c3 < 0x80 or c3 > 0xBF then return i end
        i = i + 3
      elseif c >= 0xF0 and c <= 0xF4 then
        local c3, c4 = byte(s, i + 2, i + 3)
        c3, c4 = c3 or 0, c4 or 0
        local low = (c == 0xF0) and 0x90 or 0x80
        local high = (c == 0xF4) and 0x8F or 0xBF
        if c2 < low or c2 > high or c3 < 0x80 or c3 > 0xBF or c4 < 0x80 or c4 > 0xBF then return i end
        i = i + 4
      else
        return i
      end
    end
  end
  return nil
end

local function valid_utf8(s)
  return first_invalid_utf8(s) == nil
end

-- JSON -------------------------------------------------------------------------------------
-- Objects are {object = true, keys = {...}, values = {...}}, arrays {array = true, n = count},
-- numbers {number = value, raw = text}, null NULL; strings and booleans are themselves.

local function not_json(what, at)
  fail(format("the request body is not valid JSON: %s at byte %d", what, at))
end

local ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" }

local function utf8_char(cp)
  if cp < 0x80 then
    return char(cp)
  elseif cp < 0x800 then
    return char(0xC0 + floor(cp / 64), 0x80 + cp % 64)
  elseif cp < 0x10000 then
    return char(0xE0 + floor(cp / 4096), 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
  end
  return char(0xF0 + floor(cp / 262144), 0x80 + floor(cp / 4096) % 64, 0x80 + floor(cp / 64) % 64, 0x80 + cp % 64)
end

local function skip(s, i)
  local _, last = find(s, "^[ \t\r\n]*", i)
  return last + 1
end

-- The body is known to be UTF-8 (parse_json checks it first), and escapes decode to UTF-8.
local function parse_string(s, start)
  local parts, n, j, k = {}, 0, start + 1, start + 1
  while true do
    local c = byte(s, k)
    if c == nil then not_json("a string that never ends", start) end
    if c == 34 or c == 92 or c < 32 then
      if k > j then
        n = n + 1
        parts[n] = sub(s, j, k - 1)
      end
      if c == 34 then
        return concat(parts), k + 1
      elseif c < 32 then
        not_json("a control character in a string (escape it, e.g. \\n)", k)
      end
      local escape = sub(s, k + 1, k + 1)
      if escape == "u" then
        local hex = sub(s, k + 2, k + 5)
        if not find(hex, "^%x%x%x%x$") then not_json("a \\u escape without four hex digits", k) end
        local cp = tonumber(hex, 16)
        j = k + 6
        if cp >= 0xD800 and cp <= 0xDBFF then
          local low = sub(s, k + 6, k + 11)
          if not find(low, "^\\u[dD][c-fC-F]%x%x$") then not_json("a \\u escape of half a surrogate pair", k) end
          cp = 0x10000 + (cp - 0xD800) * 1024 + (tonumber(sub(low, 3), 16) - 0xDC00)
          j = k + 12
        elseif cp >= 0xDC00 and cp <= 0xDFFF then
          not_json("a \\u escape of half a surrogate pair", k)
        end
        n = n + 1
        parts[n] = utf8_char(cp)
      else
        local decoded = ESCAPES[escape]
        if not decoded then not_json("an unknown escape in a string", k) end
        n = n + 1
        parts[n] = decoded
        j = k + 2
      end
      k = j
    else
      k = k + 1
    end
  end
end

local function parse_number(s, i)
  local _, last = find(s, "^-?%d+", i)
  if not last then not_json("an unexpected character", i) end
  if find(s, "^-?0%d", i) then not_json("a number with a leading zero", i) end
  local _, fraction = find(s, "^%.%d+", last + 1)
  if fraction then
    last = fraction
  elseif sub(s, last + 1, last + 1) == "." then
    not_json("a number without digits after the point", i)
  end
  local _, exponent = find(s, "^[eE][+-]?%d+", last + 1)
  if exponent then
    last = exponent
  elseif find(s, "^[eE]", last + 1) then
    not_json("a number without digits in its exponent", i)
  end
  local raw = sub(s, i, last)
  local value = tonumber(raw)
  if value == huge or value == -huge then
    not_json("a number too large for a double (" .. shorten(raw) .. ")", i)
  end
  return { number = value, raw = raw }, last + 1
end

local parse_value

local function parse_object(s, i, depth)
  local keys, values = {}, {}
  i = skip(s, i + 1)
  if sub(s, i, i) == "}" then return { object = true, keys = keys, values = values }, i + 1 end
  while true do
    if sub(s, i, i) ~= '"' then not_json("a key that is not a string", i) end
    local key
    key, i = parse_string(s, i)
    if values[key] ~= nil then not_json('the key "' .. shorten(key) .. '" twice in one object', i) end
    i = skip(s, i)
    if sub(s, i, i) ~= ":" then not_json("a key without a colon after it", i) end
    local value
    value, i = parse_value(s, skip(s, i + 1), depth + 1)
    keys[#keys + 1] = key
    values[key] = value
    i = skip(s, i)
    local c = sub(s, i, i)
    if c == "}" then return { object = true, keys = keys, values = values }, i + 1 end
    if c ~= "," then not_json("an object without a comma or } after a value", i) end
    i = skip(s, i + 1)
  end
end

local function parse_array(s, i, depth)
  local array, n = { array = true, n = 0 }, 0
  i = skip(s, i + 1)
  if sub(s, i, i) == "]" then return array, i + 1 end
  while true do
    n = n + 1
    array[n], i = parse_value(s, i, depth + 1)
    array.n = n
    i = skip(s, i)
    local c = sub(s, i, i)
    if c == "]" then return array, i + 1 end
    if c ~= "," then not_json("an array without a comma or ] after a value", i) end
    i = skip(s, i + 1)
  end
end

parse_value = function(s, i, depth)
  if depth > MAX_DEPTH then not_json("values nested deeper than " .. MAX_DEPTH .. " levels", i) end
  local c = sub(s, i, i)
  if c == "{" then
    return parse_object(s, i, depth)
  elseif c == "[" then
    return parse_array(s, i, depth)
  elseif c == '"' then
    return parse_string(s, i)
  elseif c == "t" and sub(s, i, i + 3) == "true" then
    return true, i + 4
  elseif c == "f" and sub(s, i, i + 4) == "false" then
    return false, i + 5
  elseif c == "n" and sub(s, i, i + 3) == "null" then
    return NULL, i + 4
  elseif c == "" then
    not_json("an unexpected end", i)
  elseif find(c, "^[-%d]") then
    return parse_number(s, i)
  end
  not_json("an unexpected character", i)
end

local function parse_json(s)
  local invalid = first_invalid_utf8(s)
  if invalid then not_json("a byte that is not UTF-8", invalid) end
  local value, i = parse_value(s, skip(s, 1), 1)
  i = skip(s, i)
  if i <= #s then not_json("more after the end of the value", i) end
  return value
end

local ESCAPES_OUT = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

local function json_string(s)
  local escaped = gsub(s, '[%z\1-\31"\\\127]', function(c)
    return ESCAPES_OUT[c] or format("\\u%04x", byte(c))
  end)
  return '"' .. escaped .. '"'
end

-- Checking a value against a field ---------------------------------------------------------

local function is_object(v) return type(v) == "table" and v.object == true end
local function is_array(v) return type(v) == "table" and v.array == true end
local function is_number(v) return type(v) == "table" and v.raw ~= nil end

local function described(v)
  if v == NULL then return "null" end
  local t = type(v)
  if t == "string" then return "a string" end
  if t == "boolean" then return tostring(v) end
  if is_number(v) then return "a number" end
  if is_array(v) then return "an array" end
  return "an object"
end

local INTEGER_RANGES = {
  int32 = { -2147483648, 2147483647 },
  uint32 = { 0, 4294967295 },
  int64 = { -9223372036854775808, 9223372036854775807 },
  uint64 = { 0, 18446744073709551615 },
}

local FORMS = {
  string = "a string",
  bytes = "a base64 string",
  bool = "true or false",
  int32 = "an integer from -2147483648 to 2147483647",
  uint32 = "an integer from 0 to 4294967295",
  int64 = "an integer",
  uint64 = "a non-negative integer",
  double = "a number",
  float = "a number",
  timestamp = 'an RFC 3339 timestamp such as "2026-12-01T00:00:00Z"',
  duration = 'a duration in seconds such as "1.5s"',
  struct = "an object",
  list = "an array",
  fieldmask = 'a comma-separated list of field names such as "name,description"',
  empty = "an object",
  any = "an object",
}

local function form(spec)
  if spec.kind == "enum" then return "one of " .. concat(spec.values, ", ") end
  if spec.kind == "message" then
    local names = MESSAGES[spec.message].names
    return names == "" and "an empty object" or "an object with the fields " .. names
  end
  return FORMS[spec.kind] or "a value"
end

local function plural_form(spec)
  local single = form(spec)
  local plurals = { ["a string"] = "strings", ["a number"] = "numbers", ["true or false"] = "true or false" }
  return plurals[single] or single
end

local DAYS = { 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

local function is_timestamp(s)
  local year, month, day, hour, minute, second, rest =
    s:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)T(%d%d):(%d%d):(%d%d)(.*)$")
  if not year then return false end
  year, month, day = tonumber(year), tonumber(month), tonumber(day)
  if year < 1 or month < 1 or month > 12 or day < 1 or day > DAYS[month] then return false end
  if month == 2 and day == 29 and not (year % 4 == 0 and (year % 100 ~= 0 or year % 400 == 0)) then
    return false
  end
  if tonumber(hour) > 23 or tonumber(minute) > 59 or tonumber(second) > 59 then return false end
  local fraction, zone = rest:match("^(%.%d+)(.*)$")
  if fraction then
    if #fraction > 10 then return false end
  else
    zone = rest
  end
  if zone == "Z" then return true end
  local sign, offset_hours, offset_minutes = zone:match("^([+-])(%d%d):(%d%d)$")
  if not sign or tonumber(offset_hours) > 23 or tonumber(offset_minutes) > 59 then return false end
  -- The instant must stay within years 1-9999 once the offset is applied.
  if year == 1 and month == 1 and day == 1 and sign == "+" then return false end
  if year == 9999 and month == 12 and day == 31 and sign == "-" then return false end
  return true
end

local function integer_text(text, kind)
  if not find(text, "^-?%d+$") or #text > 21 then return false end
  local range = INTEGER_RANGES[kind]
  local value = tonumber(text)
  return value >= range[1] and value <= range[2]
end

local function number_text(text)
  if not find(text, "^-?%d+%.?%d*[eE]?[+-]?%d*$") and not find(text, "^-?%.%d+") then return false end
  local value = tonumber(text)
  return value ~= nil and value == value and value ~= huge and value ~= -huge
end

-- A value of one element (not a map or a repeated field as a whole); `where` names it.
local check_message

local function check_single(spec, v, where, depth)
  local kind = spec.kind
  local ok
  if kind == "value" then
    return
  elseif v == NULL then
    ok = false
  elseif kind == "string" or kind == "fieldmask" then
    ok = type(v) == "string"
  elseif kind == "bytes" then
    ok = type(v) == "string" and find(v, "^[%w%+/%-_]*=?=?$") ~= nil
  elseif kind == "bool" then
    ok = type(v) == "boolean"
  elseif INTEGER_RANGES[kind] then
    local range = INTEGER_RANGES[kind]
    if is_number(v) then
      ok = v.number == floor(v.number) and v.number >= range[1] and v.number <= range[2]
    else
      ok = type(v) == "string" and integer_text(v, kind)
    end
  elseif kind == "double" or kind == "float" then
    if is_number(v) then
      ok = kind == "double" or (v.number >= -3.4028234663852886e38 and v.number <= 3.4028234663852886e38)
    else
      ok = type(v) == "string" and number_text(v)
    end
  elseif kind == "enum" then
    ok = false
    if type(v) == "string" then
      for _, name in ipairs(spec.values) do
        if name == v then ok = true end
      end
    elseif is_number(v) then
      ok = v.number == floor(v.number) and v.number >= -2147483648 and v.number <= 2147483647
    end
  elseif kind == "timestamp" then
    ok = type(v) == "string" and is_timestamp(v)
  elseif kind == "duration" then
    ok = type(v) == "string" and find(v, "^-?%d%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%.?%d*s$") ~= nil
  elseif kind == "struct" or kind == "empty" or kind == "any" then
    ok = is_object(v)
  elseif kind == "list" then
    ok = is_array(v)
  elseif kind == "message" then
    if is_object(v) then
      return check_message(spec.message, v, where .. ".", depth)
    end
    ok = false
  end
  if not ok then
    local got = described(v)
    if type(v) == "string" then
      got = "\"" .. shorten(v) .. "\""
    elseif is_number(v) then
      got = shorten(v.raw)
    end
    fail(format("%s: expected %s, got %s", where, form(spec), got))
  end
end

local function check_field(spec, v, where, depth)
  if v == NULL then
    return -- proto3 JSON: null leaves a field at its default
  end
  if spec.kind == "map" then
    local value_form = plural_form(spec.value)
    if not is_object(v) then
      fail(format('%s: expected an object of %s such as {"NAME": ...}, got %s', where, value_form, described(v)))
    end
    for _, key in ipairs(v.keys) do
      if spec.key ~= "string" then
        local valid = spec.key == "bool" and (key == "true" or key == "false") or (spec.key ~= "bool" and integer_text(key, spec.key))
        if not valid then fail(format('%s: the key "%s" is not %s', where, shorten(key), FORMS[spec.key])) end
      end
      check_single(spec.value, v.values[key], where .. "." .. shorten(key), depth + 1)
    end
  elseif spec.repeated then
    if not is_array(v) then
      fail(format("%s: expected an array of %s, got %s", where, plural_form(spec), described(v)))
    end
    for index = 1, v.n do
      check_single(spec, v[index], format("%s[%d]", where, index - 1), depth + 1)
    end
  else
    check_single(spec, v, where, depth)
  end
end

-- A field the proto marks (google.api.field_behavior) = REQUIRED must be given, and not as null:
-- absent, the transcoder would fill in its default (for PUT /api/v1/packages, an empty list,
-- which would empty the caller's list). `seen` maps the fields given to their keys in `v` (nil:
-- no body at all); a field the path binds is given there.
local function check_required(message, seen, v, prefix, taken)
  for _, spec in ipairs(message.fields) do
    if spec.required and not (taken and taken[spec.proto]) then
      local key = seen and seen[spec.proto]
      if key == nil or v.values[key] == NULL then
        local hint = spec.repeated and " (send [] for none)" or ""
        fail(format("%s%s: required, but missing%s", prefix, spec.json, hint))
      end
    end
  end
end

-- `prefix` is "" at the top of the body, "secret." inside a field; `taken` the fields bound by
-- the path (they cannot be given in the body too).
check_message = function(name, v, prefix, depth, taken)
  local message = MESSAGES[name]
  if depth > MAX_DEPTH then fail("the request body is nested too deeply") end
  local seen, oneofs = {}, {}
  for _, key in ipairs(v.keys) do
    local spec = message.by_name[key]
    local where = prefix .. shorten(key)
    if not spec then
      if message.names == "" then
        fail(format('unknown field "%s": this call takes no fields', where))
      end
      local names = message.names
      if taken then  -- the body's fields: those the path binds are not among them
        local listed = {}
        for _, field in ipairs(message.fields) do
          if not taken[field.proto] then listed[#listed + 1] = field.json end
        end
        names = concat(listed, ", ")
      end
      fail(format('unknown field "%s" (the fields are %s)', where, names))
    end
    if taken and taken[spec.proto] then
      fail(format('%s%s: given in the path; leave it out of the body', prefix, spec.json))
    end
    if seen[spec.proto] then
      fail(format('%s%s: given twice (as "%s" and "%s")', prefix, spec.json, seen[spec.proto], key))
    end
    seen[spec.proto] = key
    local value = v.values[key]
    if spec.oneof and value ~= NULL then
      if oneofs[spec.oneof] then
        fail(format("%s%s and %s%s: give only one of them", prefix, oneofs[spec.oneof], prefix, spec.json))
      end
      oneofs[spec.oneof] = spec.json
    end
    check_field(spec, value, prefix .. spec.json, depth + 1)
  end
  check_required(message, seen, v, prefix, taken)
end

-- The query string and the path ------------------------------------------------------------

local function percent_decode(text, what)
  if find((gsub(text, "%%%x%x", "")), "%%") then
    fail(format("%s: malformed percent-encoding", what))
  end
  local decoded = gsub(text, "%%(%x%x)", function(hex) return char(tonumber(hex, 16)) end)
  if not valid_utf8(decoded) then fail(format("%s: not UTF-8 once percent-decoded", what)) end
  return decoded
end

-- The field that a dotted path ("a.b") names in a message, or nil.
local function field_at(name, dotted)
  local spec
  for part in (dotted .. "."):gmatch("([^.]*)%.") do
    if not name then return nil end
    spec = MESSAGES[name].by_name[part]
    if not spec then return nil end
    name = spec.kind == "message" and not spec.repeated and spec.message or nil
  end
  return spec
end

local TEXT_KINDS = { string = true, fieldmask = true, bytes = true, bool = true, double = true, float = true, enum = true, timestamp = true, duration = true, int32 = true, uint32 = true, int64 = true, uint64 = true }

local function check_text(spec, text, where)
  local kind = spec.kind
  local ok = true
  if kind == "bool" then
    ok = text == "true" or text == "false"
  elseif INTEGER_RANGES[kind] then
    ok = integer_text(text, kind)
  elseif kind == "double" or kind == "float" then
    ok = number_text(text)
  elseif kind == "enum" or kind == "timestamp" or kind == "duration" or kind == "bytes" then
    check_single(spec, text, where, 1)
  end
  if not ok then
    fail(format('%s: expected %s, got "%s"', where, form(spec), shorten(text)))
  end
end

local function check_query(route, query, taken)
  if query == "" then return end
  local given = {}
  for pair in (query .. "&"):gmatch("([^&]*)&") do
    if pair ~= "" then
      local raw_name, raw_value = pair:match("^([^=]*)=?(.*)$")
      local name = percent_decode(raw_name, "a query parameter name")
      local shown = shorten(name)
      local value = percent_decode(raw_value, "the query parameter " .. shown)
      local spec = (route.body ~= "*") and field_at(route.input, name) or nil
      if route.body ~= "" and route.body ~= "*" and (name == route.body or find(name, "^" .. route.body .. "%.")) then
        spec = nil
      end
      if taken[name] then
        fail(format("%s: given in the path; leave it out of the query", shown))
      end
      if not spec then
        if route.body == "*" then
          fail(format('unknown query parameter "%s": this call reads its fields from the JSON body', shown))
        end
        fail(format('unknown query parameter "%s"', shown))
      end
      if not TEXT_KINDS[spec.kind] then
        fail(format('%s: cannot be given as a query parameter', shown))
      end
      if given[name] and not spec.repeated then
        fail(format("%s: given twice in the query", shown))
      end
      given[name] = true
      check_text(spec, value, shown)
    end
  end
end

local NUL_IN_PATH = "%s (in the path): must not contain a NUL byte (%%00)"

-- A path variable's value, percent-decoded; a NUL byte is refused (Envoy refuses %00 in a path
-- before any filter runs; this is for the path of a refusal worded on the response path).
local function path_value(route, captures, index)
  local variable = route.variables[index]
  local value = percent_decode(captures[index], variable .. " (in the path)")
  if find(value, "%z") then fail(format(NUL_IN_PATH, variable)) end
  return value
end

local function check_request(route, body, captures, query)
  local taken = {}
  for index, variable in ipairs(route.variables) do
    local value = path_value(route, captures, index)
    local spec = field_at(route.input, variable)
    if spec and TEXT_KINDS[spec.kind] then check_text(spec, value, variable) end
    taken[variable] = true
  end
  check_query(route, query, taken)
  local text = body or ""
  if text == "" then -- no body: every field at its default, unless one is required
    if route.body == "*" then check_required(MESSAGES[route.input], nil, nil, "", taken) end
    return
  end
  if route.body == "" then
    -- The transcoder would read it all the same, as the request message.
    fail("this call takes no request body (its fields come from the path and the query)")
  end
  if route.body == "*" then
    local value = parse_json(text)
    if not is_object(value) then
      fail("the request body must be a JSON object, got " .. described(value))
    end
    check_message(route.input, value, "", 1, taken)
  else
    local spec = MESSAGES[route.input].by_name[route.body]
    local value = parse_json(text)
    if spec.kind == "message" and not spec.repeated then
      if not is_object(value) then
        fail("the request body must be a JSON object (" .. form(spec) .. "), got " .. described(value))
      end
      check_message(spec.message, value, "", 1, taken)
    else
      check_field(spec, value, spec.json, 1)
    end
  end
end

local function refuse(handle, status, message, headers)
  local reply = headers or {}
  reply[":status"] = tostring(status)
  handle:respond(reply, message)
end

-- The route whose pattern matches `path` exactly, with `method` if one takes it (else the first
-- that matches), its captures, and the methods of every route matching the path.
local function route_for(path, method)
  local allowed, first, first_captures = {}, nil, nil
  for _, route in ipairs(ROUTES) do
    local found = { path:match(route.pattern) }
    if #found > 0 then
      if route.method == method then
        return route, found, allowed, true
      end
      allowed[#allowed + 1] = route.method
      if not first then first, first_captures = route, found end
    end
  end
  return first, first_captures, allowed, false
end

local function known_path(path)
  return DIRECT_PATHS[path] or route_for(path) ~= nil
end

-- For a path that is no route's: the known path it differs from only by trailing slashes, or nil.
local function near_path(path)
  local trimmed = (gsub(path, "/+$", ""))
  if trimmed ~= "" and trimmed ~= path and known_path(trimmed) then return trimmed end
  return nil
end

-- Header names that HTTP allows but gRPC metadata does not (only 0-9 a-z _ . -, Envoy lowercases
-- the rest): a service's gRPC server fails the whole call on one with an internal error. They mean
-- nothing to the API, so they are dropped before anything is forwarded.
local function drop_unforwardable_headers(headers)
  local unforwardable = {}
  for key, _ in pairs(headers) do
    if sub(key, 1, 1) ~= ":" and find(key, "[^0-9a-z_%.%-]") then
      unforwardable[#unforwardable + 1] = key
    end
  end
  for _, key in ipairs(unforwardable) do
    headers:remove(key)
  end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  drop_unforwardable_headers(headers)
  local request_id = headers:get("x-request-id")
  if request_id then
    -- Echoed as sent, also the one refused just below (the client can still find its answer).
    handle:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, "request_id", request_id)
  end
  if request_id and (#request_id > MAX_REQUEST_ID or not find(request_id, "^[%w%-_%.:/+=]+$")) then
    refuse(handle, 400, format(
      "x-request-id: expected 1 to %d letters, digits or -_.:/+=, got %d characters",
      MAX_REQUEST_ID, #request_id))
    return
  end
  if is_grpc(headers:get("content-type") or "") then return end
  local method = headers:get(":method")
  local full_path = headers:get(":path") or ""
  local path, query = full_path:match("^([^?]*)%??(.*)$")
  local matched, captures, allowed, takes_method = route_for(path, method)
  if not takes_method then
    if #allowed > 0 then
      local listed = concat(allowed, ", ")
      refuse(handle, 405, format("%s %s: method not allowed; this path takes %s", method, shorten(path), listed),
        { allow = listed })
    elseif not DIRECT_PATHS[path] then
      -- Answered by Envoy's own 404 spelling ("no route for <path>"), with the hint added on the
      -- way back.
      local near = near_path(path)
      if near then
        handle:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, "near_path", near)
      end
      refuse(handle, 404, "")
    end
    return
  end
  -- Read outside pcall: body() suspends the script until the whole body has arrived.
  local buffered = handle:body()
  local body = buffered and buffered:getBytes(0, buffered:length()) or ""
  if matched.stream then
    -- Its answer is newline-delimited JSON (the transcoder labels it application/json).
    handle:streamInfo():dynamicMetadata():set(METADATA_NAMESPACE, "ndjson", true)
  end
  local ok, problem = pcall(check_request, matched, body, captures, query)
  if not ok then
    if type(problem) == "table" and problem.refusal then
      refuse(handle, 400, problem.refusal)
    else
      handle:logErr("request check failed: " .. tostring(problem))
      refuse(handle, 500, "internal error")
    end
  end
end

-- Responses ------------------------------------------------------------------------------

-- Wording that must never reach a client: protobuf's, Envoy's, Python's.
local LEAKS = {
  "google%.protobuf", "googleapis", "TYPE_%u", "<class", "Traceback", "Error'", "[Ee]nvoy",
  "%f[%w][Pp]roto%f[%W]", "[Pp]rotobuf", "upstream connect", "reset reason", "%.py[\"',:]", "grpc_",
}

local function leaks(message)
  for _, pattern in ipairs(LEAKS) do
    if find(message, pattern) then return true end
  end
  return false
end

-- The words for a path Envoy refused to normalize before any filter ran (the local reply of a 400
-- carries the path and Envoy's reason): a NUL byte (%00), named by the path variable holding it.
local function unnormalizable_path(full_path)
  local path = full_path:match("^([^?]*)") or ""
  local route, captures = route_for(path)
  if route then
    for index = 1, #route.variables do
      local ok, problem = pcall(path_value, route, captures, index)
      if not ok and type(problem) == "table" and problem.refusal then return problem.refusal end
    end
  end
  local decoded = gsub(path, "%%(%x%x)", function(hex) return char(tonumber(hex, 16)) end)
  if find(decoded, "%z") then return "the path: must not contain a NUL byte (%00)" end
  return "the path cannot be normalized"
end

local function canonical_error(status, text, near)
  local code, message
  local ok, parsed = pcall(parse_json, text)
  if ok and is_object(parsed) then
    local c, m = parsed.values.code, parsed.values.message
    if is_number(c) and c.number == floor(c.number) and c.number >= 1 and c.number <= 16 then code = c.number end
    if type(m) == "string" then message = m end
    local path, reason = parsed.values.path, parsed.values.reason
    if status == 400 and reason == PATH_NORMALIZATION_FAILED and type(path) == "string" then
      message = unnormalizable_path(path)
    end
  end
  if status == 404 and near and message then
    message = message .. " (paths are matched exactly: did you mean " .. near .. "?)"
  end
  code = code or ERROR_CODES[status] or 2
  local fallback = ERROR_MESSAGES[status] or "request failed"
  if message == nil or message == "" then
    message = fallback
  elseif leaks(message) or not valid_utf8(message) then
    -- The transcoder's own complaints start with the field they are about: keep that much.
    local field = status == 400 and message:match("^([%w_%.%[%]]+): ")
    message = field and not leaks(field) and (field .. ": invalid value") or fallback
  end
  return format('{"code":%d,"message":%s,"details":[]}', code, json_string(message))
end

-- For the answers Envoy gives before any filter runs (a path it refuses to normalize), which
-- carry no request id: a random version-4 UUID, like the ones Envoy generates.
math.randomseed(os.time() + floor(os.clock() * 1000000) + (tonumber(sub(tostring({}), 8), 16) or 0))

local function new_request_id()
  local hex = gsub("xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx", "[xy]", function(c)
    return format("%x", c == "x" and math.random(0, 15) or math.random(8, 11))
  end)
  return hex
end

function envoy_on_response(handle)
  local headers = handle:headers()
  -- The request's id as this filter saw it (Envoy's or the client's), whatever the upstream sent;
  -- none for an answer Envoy gave before any filter ran.
  local seen = handle:streamInfo():dynamicMetadata():get(METADATA_NAMESPACE)
  local request_id = seen and seen.request_id
  if request_id == nil or request_id == "" then
    request_id = headers:get("x-request-id")
  end
  if request_id == nil or request_id == "" then
    request_id = new_request_id()
  end
  headers:replace("x-request-id", request_id)
  if is_grpc(headers:get("content-type") or "") then
    return -- native gRPC: HTTP 200 and its own headers
  end
  local wanted = headers:get(HTTP_STATUS_HEADER)
  headers:remove(HTTP_STATUS_HEADER)
  headers:remove("grpc-status")
  headers:remove("grpc-message")
  headers:remove("grpc-accept-encoding")
  local status = headers:get(":status")
  if status == "200" and seen and seen.ndjson then
    headers:replace("content-type", "application/x-ndjson")
  end
  if wanted ~= nil and status == "200" and find(wanted, "^[1-5]%d%d$") then
    headers:replace(":status", wanted)
    return -- a successful answer under another status (201, or 503 for a degraded health)
  end
  status = tonumber(status) or 0
  if status < 400 then return end
  if status == 401 and headers:get("www-authenticate") == nil then
    headers:add("www-authenticate", CHALLENGE)
  end
  headers:replace("content-type", "application/json")
  local body = handle:body()
  if body then
    body:setBytes(canonical_error(status, body:getBytes(0, body:length()), seen and seen.near_path))
  end
end
