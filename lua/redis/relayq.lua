#!lua name=relayq
local VERSION = 0
redis.register_function("relayq_version", function() return VERSION end)
