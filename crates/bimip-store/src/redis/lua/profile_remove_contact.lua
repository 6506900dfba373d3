-- remove_contact: both sides at once (see profile_contacts.lua on Redis Cluster). The reverse
-- side is always cleared, also when the forward entry was already gone.
-- KEYS[1] = {user}:contacts, KEYS[2] = {contact}:listed_by; ARGV[1] = user, ARGV[2] = contact.
-- Returns 1 when the contact existed.
local existed = redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[1])
return existed
