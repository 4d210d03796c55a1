"""The tool manager: a registry of tools run for agents, in its own process."""
