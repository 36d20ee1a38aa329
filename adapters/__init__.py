"""Everything that does IO: the SQLite store, recordings, replay and (live) MQTT."""
