"""free_dfml.server"""
