-- A node of a tree of runs settles what it paid and, before a step or a batch, reserves its estimate in the
-- tree's totals, so nodes running at once cannot all pass the same remaining budget: the totals hold every
-- node's real spend plus the estimate of each node's call in flight. The node's previous estimate (its call
-- that has since completed, now in its real spend) is taken out first.
--
-- KEYS[1] the tree's ledger hash
-- ARGV[1] {paid_cost, paid_tokens (what the node paid since it last settled), old_cost, old_tokens (its
--          previous estimate), est_cost, est_tokens (this call's estimate; 0 to only settle),
--          max_cost, max_tokens (-1: no limit), ttl}
--
-- -> {refused ('' | 'cost' | 'tokens'), the tree's cost total, its tokens total}; a refused estimate is not added.
local a = cjson.decode(ARGV[1])
local cost = tonumber(redis.call('HINCRBYFLOAT', KEYS[1], 'paid_cost', a.paid_cost - a.old_cost))
local tokens = tonumber(redis.call('HINCRBY', KEYS[1], 'paid_tokens', a.paid_tokens - a.old_tokens))
local refused = ''
if a.max_cost >= 0 and cost + a.est_cost > a.max_cost then
  refused = 'cost'
elseif a.max_tokens >= 0 and tokens + a.est_tokens > a.max_tokens then
  refused = 'tokens'
end
if refused == '' and (a.est_cost > 0 or a.est_tokens > 0) then
  cost = tonumber(redis.call('HINCRBYFLOAT', KEYS[1], 'paid_cost', a.est_cost))
  tokens = tonumber(redis.call('HINCRBY', KEYS[1], 'paid_tokens', a.est_tokens))
end
redis.call('EXPIRE', KEYS[1], a.ttl)
return {refused, tostring(cost), tostring(tokens)}
