-- Reserve n units of a tree's counter (sub-calls, children) unless the tree stopped or the limit would be passed.
--
-- KEYS[1] the tree's ledger (hash)
-- ARGV[1] {field, n, limit (0: none), expire_s}
--
-- -> 1 reserved, 0 refused (over the limit), -1 the tree has stopped (its reason is the ledger's 'stopped')
local a = cjson.decode(ARGV[1])
if redis.call('HEXISTS', KEYS[1], 'stopped') == 1 then return -1 end
local used = tonumber(redis.call('HGET', KEYS[1], a.field) or '0')
if a.limit > 0 and used + a.n > a.limit then return 0 end
redis.call('HINCRBY', KEYS[1], a.field, a.n)
redis.call('EXPIRE', KEYS[1], a.expire_s)
return 1
