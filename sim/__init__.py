"""free_dfml.sim: the local simulation (drives both the client and the server side)."""
