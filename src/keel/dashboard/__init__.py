"""The dashboard served by the gateway at /dashboard (docs/dashboard.md): its pages, sign-in and
JSON API, over the request log through keel.observability.queries."""
