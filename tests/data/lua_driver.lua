-- Test driver for the rendered job_submit.lua / cli_filter.lua (Lua 5.1), used by tests/test_lua.py.
--
--   lua5.1 lua_driver.lua NAME:KIND=PATH ... < cases
--
-- KIND is "submit" (a job_submit.lua) or "cli" (a cli_filter.lua). Each script is loaded into its
-- own sandbox: a stub `slurm` table and the pure standard functions, no io, os, require or load;
-- after loading, reading or writing an undeclared global is an error (and so a logged internal
-- error in the script, which the tests look for).
--
-- One case per input line, tab-separated: ID, NAME, OP, then FIELD=HEX (values hex-encoded; a
-- field that is absent is nil). OP is
--   submit   slurm_job_submit(job_desc) with the job_desc fields comment, partition, qos, gres,
--            tres_per_node, tres_per_job, tres_per_task, tres_per_socket; uid is submit_uid
--   modify   slurm_job_modify(job_desc, job_rec) with job_desc fields as above, job_rec fields
--            rec_comment, rec_partition, rec_job_id; uid is modify_uid
--   cli      slurm_cli_pre_submit(options): the same fields under their option names (tres_per_node
--            is gpus-per-node, tres_per_job gpus, tres_per_task gpus-per-task, tres_per_socket
--            gpus-per-socket)
--   submit_broken / modify_broken   the entry point with a job_desc whose every read raises
-- One output line per case: ID, then rc=accept|reject|other:N and FIELD=HEX (or FIELD=- for nil)
-- for user (log_user text), info (log_info lines), error (log_error lines) and the job_desc fields
-- comment, tres_per_node, qos, partition after the call.

local FROM_HEX, TO_HEX = {}, {}
for b = 0, 255 do
  local h = string.format("%02x", b)
  FROM_HEX[h], TO_HEX[string.char(b)] = string.char(b), h
end

local function unhex(s) return (string.gsub(s, "%x%x", FROM_HEX)) end

local function hex(s)
  if s == nil then return "-" end
  return (string.gsub(tostring(s), ".", TO_HEX))
end

local SUCCESS, ERROR, ACCESS_DENIED = 0, -1, 2002
local PURE = { "string", "table", "math", "pairs", "ipairs", "type", "tostring", "tonumber", "pcall", "error",
  "setmetatable", "getmetatable", "select", "unpack", "next", "assert", "rawget", "rawset" }

local logs
local function logger(kind)
  return function(fmt, ...)
    local t = logs[kind]
    t[#t + 1] = string.format(fmt, ...)
  end
end

local function load_sandboxed(path)
  local slurm = { SUCCESS = SUCCESS, ERROR = ERROR, FAILURE = ERROR, ESLURM_ACCESS_DENIED = ACCESS_DENIED,
    log_user = logger("user"), log_info = logger("info"), log_error = logger("error") }
  local env = { slurm = slurm }
  for _, name in ipairs(PURE) do env[name] = _G[name] end
  local chunk = assert(loadfile(path))
  setfenv(chunk, env)
  chunk()
  setmetatable(env, {
    __index = function(_, k) error("read of undeclared global " .. tostring(k), 2) end,
    __newindex = function(_, k) error("write of undeclared global " .. tostring(k), 2) end,
  })
  return env
end

local scripts = {}
for _, a in ipairs(arg) do
  local name, kind, path = string.match(a, "^([^:]+):(%a+)=(.+)$")
  assert(name, "bad argument " .. a)
  scripts[name .. ":" .. kind] = load_sandboxed(path)
end

local JOB_FIELDS = { "comment", "partition", "qos", "gres", "tres_per_node", "tres_per_job", "tres_per_task",
  "tres_per_socket" }
local OPTION_NAMES = { tres_per_node = "gpus-per-node", tres_per_job = "gpus", tres_per_task = "gpus-per-task",
  tres_per_socket = "gpus-per-socket" }
local BROKEN = setmetatable({}, { __index = function(_, k) error("job_desc." .. tostring(k) .. " exploded") end })

local function job_desc_from(fields)
  local jd = {}
  for _, k in ipairs(JOB_FIELDS) do jd[k] = fields[k] end
  return jd
end

for line in io.lines() do
  local parts = {}
  for p in string.gmatch(line, "[^\t]+") do parts[#parts + 1] = p end
  local id, name, op = parts[1], parts[2], parts[3]
  local fields = {}
  for i = 4, #parts do
    local k, v = string.match(parts[i], "^([%w_]+)=(%x*)$")
    assert(k, "bad field " .. parts[i])
    fields[k] = unhex(v)
  end
  local uid = tonumber(fields.uid or "1000")
  logs = { user = {}, info = {}, error = {} }
  local rc, jd
  if op == "submit" or op == "submit_broken" then
    jd = op == "submit" and job_desc_from(fields) or BROKEN
    rc = scripts[name .. ":submit"].slurm_job_submit(jd, {}, uid)
  elseif op == "modify" or op == "modify_broken" then
    jd = op == "modify" and job_desc_from(fields) or BROKEN
    local rec = { comment = fields.rec_comment, partition = fields.rec_partition,
      job_id = tonumber(fields.rec_job_id or "42") }
    rc = scripts[name .. ":submit"].slurm_job_modify(jd, rec, {}, uid)
  elseif op == "cli" then
    local options = {}
    for _, k in ipairs(JOB_FIELDS) do options[OPTION_NAMES[k] or k] = fields[k] end
    rc = scripts[name .. ":cli"].slurm_cli_pre_submit(options, 0)
    jd = job_desc_from(fields)
  else
    error("unknown op " .. tostring(op))
  end
  local status = (rc == SUCCESS and "accept") or ((rc == ACCESS_DENIED or rc == ERROR) and "reject")
    or ("other:" .. tostring(rc))
  if jd == BROKEN then jd = {} end
  io.write(id, "\trc=", status, "\tuser=", hex(table.concat(logs.user, "\n")), "\tinfo=",
    hex(table.concat(logs.info, "\n")), "\terror=", hex(table.concat(logs.error, "\n")),
    "\tcomment=", hex(jd.comment), "\ttres_per_node=", hex(jd.tres_per_node), "\tqos=", hex(jd.qos),
    "\tpartition=", hex(jd.partition), "\n")
end
