"""Virtual keys and tenants: who is calling, which models they may use, whose data they see.

`keys` (the key itself, its hash, what a caller presented), `store` (keys in the request-log
database), `lookup` (the hot path's cache in front of the store), `stage` (the auth stage),
`admin` (the admin API's key and request-log routes, scoped by tenant).
"""
