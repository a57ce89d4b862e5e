"""Stand-ins for one machine: a private redis-server and tiny offline models (demo, tests, benches)."""
