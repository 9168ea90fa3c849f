"""free_dfml.client"""
