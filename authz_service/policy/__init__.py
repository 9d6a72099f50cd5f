"""Access policy engines: each compiles a policy once at config load and evaluates it per request."""
