"""The request log, traces, metrics and reports: everything Keel shows comes from here."""
