"""Stand-ins for remote vendors, for Keel's tests and for users' own chaos tests."""
