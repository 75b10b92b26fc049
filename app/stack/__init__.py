"""The local stack's processes: the embedded launcher, bootstrap, the supervisor."""
