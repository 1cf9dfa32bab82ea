"""The read-only dashboard: a WSGI app over the state store, served by `audience-sync ui` and
by the daemon's health port."""
